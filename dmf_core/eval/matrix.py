"""The cross-domain matrix: every ``reports/eval/<row>__<target>.json`` -> JSON, Markdown, heatmap
and the matrix's DVC metric; plus the CMC TSV that DVC plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from dmf_core.paths import PRETRAIN_ROW
from dmf_core.rows import trains_on

log = logging.getLogger(__name__)

KEYS = ("rank1", "rank5", "rank10", "mAP", "mINP")


def load_eval_results(eval_dir: Path) -> dict[tuple[str, str], dict]:
    """``{(row, target): record}`` from ``<eval_dir>/<row>__<target>.json``; ``ValueError``
    naming the file on a bad name, bad JSON or a missing metric key."""
    eval_dir = Path(eval_dir)
    results: dict[tuple[str, str], dict] = {}
    if not eval_dir.is_dir():
        return results
    for path in sorted(eval_dir.glob("*.json")):
        parts = path.stem.split("__")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{path}: expected a file name <row>__<target>.json")
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


def _row_order(rows: set[str]) -> list[str]:
    """``pretrain`` first (the pretraining claim's row), then the fine-tuning sources sorted."""
    return ([PRETRAIN_ROW] if PRETRAIN_ROW in rows else []) + sorted(rows - {PRETRAIN_ROW})


def _mean(cells: list[dict]) -> dict:
    return {k: round(float(np.mean([c[k] for c in cells])), 2) for k in KEYS} if cells else {}


def build_matrix(results: dict[tuple[str, str], dict], not_transfer: dict[tuple[str, str], str] | None = None) -> dict:
    """The whole matrix (``reports/eval_matrix.json``), values in percent::

        {"sources": rows ("pretrain" first), "targets", "cells": {row: {target: {rank1.., "untrained": {..}
         (from the cell, else from the pretrain row's cell of that target),
         "num_query", "num_gallery", "num_valid_query"[, "not_transfer": reason]}}},
         "cross_domain": {row: five means over the targets the row does not train on (every
         target for pretrain)}, "in_domain": {row: the five of the target it trains on, or their
         mean over its datasets}, "untrained_cross_domain": {...}, "untrained_init"}

    ``not_transfer`` marks cells that are no transfer result (the source's training images hold
    the target's test images): they stay in the table, flagged, and out of every mean.
    """
    if not results:
        raise ValueError("build_matrix: no evaluation results (reports/eval/ is empty)")
    not_transfer = not_transfer or {}
    rows = _row_order({s for s, _ in results})
    targets = sorted({t for _, t in results})
    cells: dict[str, dict] = {r: {} for r in rows}
    # the untrained reference is one model for every row: the pretrain row's cells carry it
    shared_untrained = {t: rec["untrained"] for (s, t), rec in results.items() if s == PRETRAIN_ROW and "untrained" in rec}
    inits = set()
    for (s, t), rec in sorted(results.items()):
        cell = _pick(rec)
        cell["untrained"] = _pick(rec.get("untrained") or shared_untrained.get(t))
        for extra in ("num_query", "num_gallery", "num_valid_query"):
            if extra in rec:
                cell[extra] = rec[extra]
        if (s, t) in not_transfer:
            cell["not_transfer"] = not_transfer[(s, t)]
        if "untrained_init" in rec:
            inits.add(rec["untrained_init"])
        cells[s][t] = cell

    def cross(row: str) -> list[dict]:
        return [c for t, c in cells[row].items() if not trains_on(row, t) and "not_transfer" not in c]

    in_domain = {r: own for r in rows if (own := _in_domain(r, cells[r]))}
    return {"sources": rows, "targets": targets, "cells": cells,
            "cross_domain": {r: _mean(cross(r)) for r in rows},
            "in_domain": in_domain,
            "untrained_cross_domain": {r: _mean([c["untrained"] for c in cross(r) if c["untrained"]]) for r in rows},
            "untrained_init": " / ".join(sorted(inits)) or "random weights"}


def _in_domain(row: str, cells: dict[str, dict], untrained: bool = False) -> dict | None:
    """The cell of the target a row trains on, or for a row of several datasets the mean of those
    cells (``untrained``: of their untrained reference)."""
    own = [c["untrained"] if untrained else c for t, c in cells.items() if trains_on(row, t)]
    own = [c for c in own if c]
    if not own:
        return None
    return _pick(own[0]) if len(own) == 1 else _mean(own)


#: The numbers of a cell that DVC diffs (the rest stays in the whole matrix).
METRIC_KEYS = ("mAP", "rank1")


def matrix_metrics(matrix: dict) -> dict:
    """What DVC diffs of a matrix (``metrics/eval_matrix.json``): mAP and rank-1 of every cell,
    and per row the cross-domain and the in-domain means, so that ``dvc exp show`` names a column
    ``cells.pretrain.sp_cuhk.mAP`` or ``cross_domain.sp_market.mAP``. rank-5/10, mINP, the
    untrained reference and the counts stay in the whole matrix (``reports/eval_matrix.json``).
    Cells marked ``not_transfer`` are left out."""
    def pick(d: dict) -> dict:
        return {k: d[k] for k in METRIC_KEYS if k in d}

    return {
        "cells": {r: {t: pick(c) for t, c in matrix["cells"][r].items() if "not_transfer" not in c}
                  for r in matrix["sources"]},
        "cross_domain": {r: pick(m) for r, m in matrix["cross_domain"].items()},
        "in_domain": {r: pick(m) for r, m in matrix["in_domain"].items()},
    }


def _fmt(cell: dict | None) -> str:
    return f"{cell['rank1']:.1f} / {cell['mAP']:.1f}" if cell else "-"


def _table(matrix: dict, untrained: bool) -> list[str]:
    targets = matrix["targets"]
    head = "| model \\ target | " + " | ".join(targets) + " | cross-domain mean | in-domain |"
    lines = [head, "|---|" + "---:|" * (len(targets) + 2)]
    for r in matrix["sources"]:
        row = [f"| {r} "]
        for t in targets:
            cell = matrix["cells"][r].get(t)
            shown = cell and (cell["untrained"] if untrained else cell)
            mark = " †" if cell and "not_transfer" in cell else ""
            row.append(f"| {_fmt(shown)}{mark} ")
        cross = matrix["untrained_cross_domain" if untrained else "cross_domain"][r]
        own = _in_domain(r, matrix["cells"][r], untrained)
        row.append(f"| **{_fmt(cross)}** | {_fmt(own) if own else '-'} |")
        lines.append("".join(row))
    return lines


def untrained_reference(matrix: dict) -> dict[str, dict] | None:
    """The untrained model's cell per target, when every row holds the same one (they share one
    untrained model, the ``pretrain`` row's); None when rows differ (records of older runs)."""
    per_target: dict[str, dict] = {}
    for r in matrix["sources"]:
        for t, cell in matrix["cells"][r].items():
            if not cell.get("untrained"):
                continue
            if per_target.setdefault(t, cell["untrained"]) != cell["untrained"]:
                return None
    return {t: per_target[t] for t in matrix["targets"] if t in per_target} or None


def _untrained_lines(matrix: dict) -> list[str]:
    """One row: the untrained architecture on every target and its mean over all of them; the
    table per row only where rows disagree on it."""
    head = f"## Untrained reference (the same architecture at initialisation: {matrix['untrained_init']})"
    reference = untrained_reference(matrix)
    if reference is None:
        return ["", head, "", *_table(matrix, untrained=True)]
    targets = matrix["targets"]
    cells = [reference.get(t) for t in targets]
    mean = _mean([c for c in cells if c])
    return ["", head, "", "One model, the floor every row above is measured against.", "",
            "| model \\ target | " + " | ".join(targets) + " | mean |",
            "|---|" + "---:|" * (len(targets) + 1),
            "| untrained | " + " | ".join(_fmt(c) for c in cells) + f" | **{_fmt(mean)}** |"]


def matrix_markdown(matrix: dict) -> str:
    """Rank-1 / mAP (percent) per model x target with the cross-domain mean (the targets a row
    does not train on; every target for ``pretrain``) and the in-domain cell(s), then the untrained architecture once,
    then mINP; pipe tables, readable in a terminal."""
    lines = ["# Cross-domain evaluation", "",
             "Rank-1 / mAP in percent (Market-1501 protocol). Rows: `pretrain` is the pretrained model "
             "itself, the others are fine-tuned on that source (several joined by `+`: on all of them "
             "at once); columns: target. The cross-domain mean leaves out the in-domain cells (the "
             "targets a row trains on), whose mean is the in-domain column.", ""]
    lines += _table(matrix, untrained=False)
    flagged = [(r, t, c["not_transfer"]) for r in matrix["sources"] for t, c in matrix["cells"][r].items()
               if "not_transfer" in c]
    if flagged:
        lines += [""] + [f"† {r} -> {t}: not a transfer result, left out of the means: {why}" for r, t, why in flagged]
    lines += _untrained_lines(matrix)
    lines += ["", "## mINP (trained)", "",
              "| model \\ target | " + " | ".join(matrix["targets"]) + " | cross-domain mean |",
              "|---|" + "---:|" * (len(matrix["targets"]) + 1)]
    for r in matrix["sources"]:
        cells = [matrix["cells"][r].get(t) for t in matrix["targets"]]
        lines.append(f"| {r} | " + " | ".join(f"{c['mINP']:.1f}" if c else "-" for c in cells)
                     + f" | {matrix['cross_domain'][r].get('mINP', float('nan')):.1f} |")
    return "\n".join(lines) + "\n"


def plot_heatmap(matrix: dict, out_png: Path) -> Path:
    """mAP and rank-1 heatmaps side by side (models x targets + cross-domain mean column),
    annotated cells; in-domain cells outlined, cells that are no transfer result hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, targets = matrix["sources"], matrix["targets"]
    cols = targets + ["cross-domain"]
    fig, axes = plt.subplots(1, 2, figsize=(2.6 + 1.3 * len(cols) * 2, 1.2 + 0.6 * len(rows)), squeeze=False)
    for ax, key, title in zip(axes[0], ("mAP", "rank1"), ("mAP (%)", "rank-1 (%)")):
        grid = np.full((len(rows), len(cols)), np.nan)
        for i, r in enumerate(rows):
            for j, t in enumerate(targets):
                cell = matrix["cells"][r].get(t)
                if cell:
                    grid[i, j] = cell[key]
                    if trains_on(r, t):
                        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="white", lw=1.5, ls="--"))
                    if "not_transfer" in cell:
                        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", ec="red"))
            grid[i, -1] = matrix["cross_domain"][r].get(key, np.nan)
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(1.0, float(np.nanmax(grid))), aspect="auto")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if np.isfinite(grid[i, j]):
                    bright = grid[i, j] > 0.6 * im.get_clim()[1]
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=9,
                            color="black" if bright else "white")
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        ax.axvline(len(targets) - 0.5, color="white", lw=2)
        if PRETRAIN_ROW in rows:
            ax.axhline(0.5, color="white", lw=2)
        ax.set_xlabel("target")
        ax.set_ylabel("model (pretrain, or fine-tuned on)")
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
