"""Pictures for the README: SynthPed images with the captions the ``captions`` stage wrote for them."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from dmf_core import paths

log = logging.getLogger(__name__)


def pick_samples(manifest: pd.DataFrame, captions: pd.DataFrame, num: int, seed: int) -> pd.DataFrame:
    """``num`` captioned images of distinct identities (deterministic for a seed): image_id, pid, caption."""
    first = (captions.sort_values(["image_id", "caption_idx"], kind="mergesort")
             .drop_duplicates("image_id", keep="first")[["image_id", "caption"]])
    rows = manifest[["image_id", "pid"]].merge(first, on="image_id", how="inner")
    if rows.empty:
        raise ValueError("no image of the manifest has a caption (do the manifest and captions belong together?)")
    rng = np.random.default_rng(seed)
    pids = rows["pid"].unique()
    chosen = rng.permutation(pids)[: min(num, len(pids))]
    picks = [rows[rows["pid"] == pid].sample(1, random_state=int(rng.integers(2**31))) for pid in chosen]
    return pd.concat(picks, ignore_index=True)


def sample_sheet_with_captions(out_png: str | Path, *, dataset: str = "synthped", manifest: str | Path | None = None,
                               captions: str | Path | None = None, raw_root: str | Path | None = None,
                               num: int = 6, seed: int = 0, wrap: int = 26) -> Path:
    """Render ``num`` images (one per identity) side by side with their caption wrapped under each.

    Defaults: ``data/manifests/<dataset>.parquet``, the captions parquet of the captions stage
    (``data/captions/finegpr.parquet`` for synthped) and ``data/raw/<dataset>/``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from dmf_core.eval.visualise import save_png

    manifest = Path(manifest or paths.manifest_path(dataset))
    captions = Path(captions or paths.captions_parquet(dataset))
    raw_root = Path(raw_root or paths.raw_dir(dataset))
    for path, stage in ((manifest, f"download@{dataset}"), (captions, "captions")):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; run `dvc repro {stage}` first")
    samples = pick_samples(pd.read_parquet(manifest), pd.read_parquet(captions), num, seed)
    wrapped = ["\n".join(textwrap.wrap(str(c), wrap)) for c in samples["caption"]]
    text_lines = max(w.count("\n") + 1 for w in wrapped)
    n = len(samples)
    col_w, img_h, title_h, line_h, pad = 1.9, 2.6, 0.3, 0.125, 0.15  # inches
    text_h = text_lines * line_h + pad
    fig_w, fig_h = col_w * n, title_h + img_h + text_h
    fig = plt.figure(figsize=(fig_w, fig_h))
    for i, ((_, row), text) in enumerate(zip(samples.iterrows(), wrapped)):
        ax = fig.add_axes([(i * col_w + 0.08) / fig_w, text_h / fig_h, (col_w - 0.16) / fig_w, img_h / fig_h])
        with Image.open(raw_root / row["image_id"]) as im:
            ax.imshow(im.convert("RGB"))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"id {int(row['pid'])}", fontsize=8, pad=3)
        fig.text((i + 0.5) * col_w / fig_w, (text_h - 0.06) / fig_h, text, fontsize=6.5, ha="center",
                 va="top", linespacing=1.2)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, out_png, dpi=130, facecolor="white")
    plt.close(fig)
    log.info("%d captioned samples -> %s", n, out_png)
    return out_png
