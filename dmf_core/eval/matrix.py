"""The cross-domain matrix: every ``reports/eval/<source>__<target>.json`` -> JSON, Markdown, heatmap
and the matrix's DVC metric; plus the CMC TSV that DVC plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

KEYS = ("rank1", "rank5", "rank10", "mAP", "mINP")
TABLE_KEYS = ("rank1", "mAP", "mINP")


def load_eval_results(eval_dir: Path) -> dict[tuple[str, str], dict]:
    """``{(source, target): record}`` from ``<eval_dir>/<source>__<target>.json``; ``ValueError``
    naming the file on a bad name, bad JSON or a missing metric key."""
    eval_dir = Path(eval_dir)
    results: dict[tuple[str, str], dict] = {}
    if not eval_dir.is_dir():
        return results
    for path in sorted(eval_dir.glob("*.json")):
        parts = path.stem.split("__")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{path}: expected a file name <source>__<target>.json")
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        missing = [k for k in KEYS if k not in record]
        if missing:
            raise ValueError(f"{path}: missing metric key(s) {missing}; expected {list(KEYS)}")
        results[(parts[0], parts[1])] = record
    return results


def _pick(record: dict | None) -> dict | None:
    if not record:
        return None
    return {k: float(record[k]) for k in KEYS if k in record}


def build_matrix(results: dict[tuple[str, str], dict]) -> dict:
    """The whole matrix (``reports/eval_matrix.json``): ``{"sources", "targets", "cells": {source:
    {target: {rank1.., "untrained": {..}, "num_query", "num_gallery", "num_valid_query"}}}, "mean":
    {source: {the five over the targets}}, "untrained_mean": {...}}``; values in percent."""
    if not results:
        raise ValueError("build_matrix: no evaluation results (reports/eval/ is empty)")
    sources = sorted({s for s, _ in results})
    targets = sorted({t for _, t in results})
    cells: dict[str, dict] = {s: {} for s in sources}
    for (s, t), rec in sorted(results.items()):
        cell = _pick(rec)
        cell["untrained"] = _pick(rec.get("untrained"))
        for extra in ("num_query", "num_gallery", "num_valid_query"):
            if extra in rec:
                cell[extra] = rec[extra]
        cells[s][t] = cell

    def mean(source: str, untrained: bool) -> dict:
        vals = [c["untrained"] if untrained else c for c in cells[source].values()]
        vals = [v for v in vals if v]
        return {k: round(float(np.mean([v[k] for v in vals])), 2) for k in KEYS} if vals else {}

    return {"sources": sources, "targets": targets, "cells": cells,
            "mean": {s: mean(s, False) for s in sources},
            "untrained_mean": {s: mean(s, True) for s in sources}}


def matrix_metrics(matrix: dict) -> dict:
    """What DVC diffs of a matrix (``metrics/eval_matrix.json``), laid out like its table: one
    entry per row, ``{source: {target: {rank1, rank5, rank10, mAP, mINP}, ..., "mean": {the same
    five over the targets}}}``, so that ``dvc exp show`` names a column ``sp_market.sp_cuhk.mAP``
    or ``sp_market.mean.mAP``: 5 x sources x (targets + 1) columns. The untrained reference and
    the query/gallery counts stay in the whole matrix (``reports/eval_matrix.json``)."""
    if "mean" in matrix["targets"]:
        raise ValueError("a target named 'mean' would hide the mean over the targets; rename the dataset")
    return {s: {**{t: {k: cell[k] for k in KEYS} for t, cell in matrix["cells"][s].items()},
                "mean": dict(matrix["mean"][s])}
            for s in matrix["sources"]}


def _table(matrix: dict, untrained: bool) -> list[str]:
    targets = matrix["targets"]
    head = "| source \\ target | " + " | ".join(targets) + " | mean |"
    lines = [head, "|---|" + "---:|" * (len(targets) + 1)]
    for s in matrix["sources"]:
        row = [f"| {s} "]
        for t in targets:
            cell = matrix["cells"][s].get(t)
            cell = cell and (cell["untrained"] if untrained else cell)
            row.append(f"| {cell['rank1']:.1f} / {cell['mAP']:.1f} " if cell else "| - ")
        m = matrix["untrained_mean" if untrained else "mean"][s]
        row.append(f"| {m['rank1']:.1f} / {m['mAP']:.1f} |" if m else "| - |")
        lines.append("".join(row))
    return lines


def matrix_markdown(matrix: dict) -> str:
    """Rank-1 / mAP (percent) per source x target with the mean over targets, then the same table
    for the untrained architecture; pipe tables, readable in a terminal."""
    lines = ["# Cross-domain evaluation", "",
             "Rank-1 / mAP in percent (Market-1501 protocol). Rows: fine-tuning source; columns: target.", ""]
    lines += _table(matrix, untrained=False)
    lines += ["", "## Untrained baseline (same architecture, random weights)", ""]
    lines += _table(matrix, untrained=True)
    lines += ["", "## mINP (trained)", "",
              "| source \\ target | " + " | ".join(matrix["targets"]) + " | mean |",
              "|---|" + "---:|" * (len(matrix["targets"]) + 1)]
    for s in matrix["sources"]:
        cells = [matrix["cells"][s].get(t) for t in matrix["targets"]]
        lines.append(f"| {s} | " + " | ".join(f"{c['mINP']:.1f}" if c else "-" for c in cells)
                     + f" | {matrix['mean'][s].get('mINP', float('nan')):.1f} |")
    return "\n".join(lines) + "\n"


def plot_heatmap(matrix: dict, out_png: Path) -> Path:
    """mAP and rank-1 heatmaps side by side (sources x targets + mean column), annotated cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources, targets = matrix["sources"], matrix["targets"]
    cols = targets + ["mean"]
    fig, axes = plt.subplots(1, 2, figsize=(2.0 + 1.3 * len(cols) * 2, 1.2 + 0.6 * len(sources)),
                             squeeze=False)
    for ax, key, title in zip(axes[0], ("mAP", "rank1"), ("mAP (%)", "rank-1 (%)")):
        grid = np.full((len(sources), len(cols)), np.nan)
        for i, s in enumerate(sources):
            for j, t in enumerate(targets):
                cell = matrix["cells"][s].get(t)
                if cell:
                    grid[i, j] = cell[key]
            grid[i, -1] = matrix["mean"][s].get(key, np.nan)
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(1.0, float(np.nanmax(grid))), aspect="auto")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if np.isfinite(grid[i, j]):
                    bright = grid[i, j] > 0.6 * im.get_clim()[1]
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=9,
                            color="black" if bright else "white")
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
        ax.set_yticks(range(len(sources)), sources)
        ax.axvline(len(targets) - 0.5, color="white", lw=2)
        ax.set_xlabel("target")
        ax.set_ylabel("source")
        ax.set_title(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def write_cmc_tsv(cmc, path: Path) -> Path:
    """``rank<TAB>cmc`` (cmc in percent, 4 dp), ranks 1..len(cmc): a DVC plot."""
    cmc = np.asarray(cmc, dtype=np.float64).ravel()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["rank\tcmc"] + [f"{i + 1}\t{100.0 * v:.4f}" for i, v in enumerate(cmc)]
    path.write_text("\n".join(rows) + "\n")
    return path
