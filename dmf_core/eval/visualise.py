"""Ranked-list pictures: a few queries with their top-k gallery images under the protocol.

Frames: green = true match, red = wrong identity, grey with a "same cam" label = a same-pid
same-camera item that the protocol removes (shown where it would have ranked, not counted).
Images come through ``load_image(kind, index)`` (``kind`` is ``"query"`` or ``"gallery"``) returning
a PIL image, so the pictures do not care where images live.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

GREEN, RED, GREY, BLUE = "#1a9641", "#d7191c", "#9e9e9e", "#2b83ba"
MAP_GAP = 2  # pixels between a thumbnail and its map under it


def save_png(fig, out_png: Path, dpi: int, **savefig_kwargs) -> Path:
    """Save ``fig`` as a 256-colour palette PNG: a page of photos stays a few hundred KB, not MBs."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, **savefig_kwargs)
    buf.seek(0)
    with Image.open(buf) as im:
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out_png, optimize=True)
    return out_png


def _frame(ax, color: str, width: float = 4.0) -> None:
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(width)
        spine.set_visible(True)
    ax.set_xticks([])
    ax.set_yticks([])


def _judged_rows(query_items: Sequence[dict], gallery_items: Sequence[dict], ranks: Sequence[Sequence[int]],
                 top_k: int, distances: Sequence[Sequence[float]] | None) -> list[list[tuple]]:
    """Per query, the (gallery item, kind, rank kept, distance) of each item drawn: until ``top_k``
    items that the protocol keeps. Kind: match, wrong, removed (same pid and camera) or unjudged."""
    rows = []
    for qi, q in enumerate(query_items):
        shown, kept = [], 0
        for pos, j in enumerate(ranks[qi]):
            g = gallery_items[int(j)]
            same_pid, same_cam = g["pid"] == q["pid"], g["camid"] == q["camid"]
            if q["pid"] is None:
                kind = "unjudged"
            else:
                kind = "removed" if (same_pid and same_cam) else ("match" if same_pid else "wrong")
            if kind != "removed":
                kept += 1
            d = None if distances is None else float(distances[qi][pos])
            shown.append((g, kind, kept, d))
            if kept >= top_k:
                break
        rows.append(shown)
    return rows


def _thumbnail(load_image: Callable[[str, int], object], load_map: Callable[[str, int], object] | None,
               kind: str, index: int, size):
    """The item's image at ``size`` (w, h); with ``load_map``, its map under it in the same picture."""
    image = load_image(kind, index).convert("RGB").resize(size)
    if load_map is None:
        return image
    from PIL import Image

    w, h = size
    both = Image.new("RGB", (w, 2 * h + MAP_GAP), "white")
    both.paste(image, (0, 0))
    both.paste(load_map(kind, index).convert("RGB").resize(size), (0, h + MAP_GAP))
    return both


def _draw_row(axes, q: dict, shown: list[tuple], load_image: Callable[[str, int], object], size,
              load_map: Callable[[str, int], object] | None) -> None:
    """One query's row: the query (blue frame), then each item drawn, framed and titled by its kind."""
    ax = axes[0]
    ax.imshow(_thumbnail(load_image, load_map, "query", int(q["index"]), size))
    _frame(ax, BLUE)
    ax.set_title(f"query\n{q.get('label', '')}" if q["pid"] is None else f"query\npid {q['pid']} c{q['camid']}",
                 fontsize=6)
    for c, (g, kind, kept, d) in enumerate(shown, start=1):
        ax = axes[c]
        ax.imshow(_thumbnail(load_image, load_map, "gallery", int(g["index"]), size))
        color = {"match": GREEN, "wrong": RED, "removed": GREY, "unjudged": GREY}[kind]
        _frame(ax, color, 2.0 if kind in ("removed", "unjudged") else 4.0)
        label = "same cam" if kind == "removed" else f"#{kept}"
        if d is not None:
            label += f"\n{d:.4f}"  # cosine distances of a good model are small
        if kind == "unjudged":
            label += f"\nid {g['pid']} c{g['camid']}"
        ax.set_title(label, fontsize=6, color=color if kind == "removed" else "black")
    for c in range(len(shown) + 1, len(axes)):
        axes[c].axis("off")


def plot_ranked_list(query_items: Sequence[dict], gallery_items: Sequence[dict], ranks: Sequence[Sequence[int]],
                     out_png: Path, *, load_image: Callable[[str, int], object], top_k: int = 10,
                     distances: Sequence[Sequence[float]] | None = None, thumb=(64, 32),
                     title: str | None = None, load_map: Callable[[str, int], object] | None = None) -> Path:
    """One row per query: the query image, then its ``top_k`` gallery images in ``ranks[i]`` order.

    ``query_items[i]`` / ``gallery_items[j]``: dicts with ``index`` (for ``load_image``), ``pid`` and
    ``camid``; a query whose ``pid`` is None (a search for an unknown person, optional ``label``)
    gets neutral frames and each match is titled with its id and camera instead of being judged.
    ``ranks[i]``: gallery positions (into ``gallery_items``) nearest first, removed items
    included (they are drawn grey and do not use up a rank). Writes a small PNG (thumbnails of
    ``thumb`` = (height, width) pixels). With ``load_map(kind, index)`` (a PIL image: the item
    with its map over it, :func:`dmf_core.eval.explain.map_loader`) each thumbnail has its map
    under it, in the same frame; without it the picture is as before, byte for byte."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(query_items) != len(ranks):
        raise ValueError(f"ranks: {len(ranks)} lists for {len(query_items)} queries")
    if not query_items:
        raise ValueError("plot_ranked_list: no queries to show")
    rows = _judged_rows(query_items, gallery_items, ranks, top_k, distances)
    ncols = 1 + max(len(r) for r in rows)
    h, w = thumb
    row_inches = 1.45 if load_map is None else 1.45 + 1.05
    fig, axes = plt.subplots(len(rows), ncols, figsize=(ncols * 0.75, len(rows) * row_inches), squeeze=False)
    for i, (q, shown) in enumerate(zip(query_items, rows)):
        _draw_row(axes[i], q, shown, load_image, (w, h), load_map)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout(pad=0.3)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, out_png, dpi=90)
    plt.close(fig)
    size = out_png.stat().st_size
    if size > 400_000:
        log.warning("%s is %.0f KB (> 400 KB)", out_png, size / 1e3)
    return out_png


def ranked_list_for_queries(query_feats, gallery_feats, q_pids, g_pids, q_camids, g_camids, *,
                            load_image: Callable[[str, int], object], num_queries: int = 4, seed: int = 0,
                            out_png: Path, top_k: int = 10, metric: str = "cosine",
                            load_map: Callable[[str, int], object] | None = None) -> Path:
    """Pick ``num_queries`` queries that have a true match (seeded), rank the gallery by ``metric``
    distance and draw :func:`plot_ranked_list` (with ``load_map``: the maps under each row).
    Only the chosen rows of distances are computed."""
    from dmf_core.eval.distances import distance

    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    valid = [i for i in range(len(q_pids))
             if np.any((g_pids == q_pids[i]) & (g_camids != q_camids[i]))]
    if not valid:
        raise ValueError("ranked list: no query has a true match in the gallery")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(valid, size=min(num_queries, len(valid)), replace=False).tolist())
    dist = distance(np.asarray(query_feats)[chosen], gallery_feats, metric)
    ranks, dists = [], []
    for row in dist:
        order = np.argsort(row, kind="stable")[: top_k * 4 + 20]
        ranks.append(order)
        dists.append(row[order])
    q_items = [{"index": i, "pid": int(q_pids[i]), "camid": int(q_camids[i])} for i in chosen]
    g_items = [{"index": j, "pid": int(p), "camid": int(c)} for j, (p, c) in enumerate(zip(g_pids, g_camids))]
    return plot_ranked_list(q_items, g_items, ranks, out_png, load_image=load_image, top_k=top_k,
                            distances=dists, load_map=load_map)
