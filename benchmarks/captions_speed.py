"""Benchmark: caption a FineGPR-sized manifest (1,150 ids x 36 viewpoints x 7 weathers x 7 illuminations).

Builds the manifest in memory (image ids like FineGPR/0001/0001_c01_w01_l01_p03.jpg, a random scene
per image), random attributes for the ids, then times ``generate_captions`` and, with ``--write``,
``write_captions`` (parquet + COCO JSON into a temporary folder). Prints wall times and the peak
resident memory of this process (``resource.getrusage(RUSAGE_SELF).ru_maxrss``); run it in a fresh
process so the peak belongs to this workload:

    .venv/bin/python benchmarks/captions_speed.py [--ids 1150] [--per-image 2] [--write]
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dmf_core.data.captions.attributes import ATTRIBUTE_CODES, ATTRIBUTE_COLUMNS
from dmf_core.data.captions.generate import DEFAULT_VIEWPOINT_WORDS, generate_captions, write_captions


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build_inputs(n_ids: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    pids = np.sort(rng.choice(np.arange(1, 3 * n_ids), size=n_ids, replace=False)).astype(np.int64)
    attrs = pd.DataFrame({"pid": pids, **{c: rng.choice(list(ATTRIBUTE_CODES[c]), size=n_ids).astype("int8")
                                           for c in ATTRIBUTE_COLUMNS}})
    grid = np.stack(np.meshgrid(np.arange(n_ids), np.arange(1, 37), np.arange(1, 8), np.arange(1, 8),
                                indexing="ij"), axis=-1).reshape(-1, 4)
    pid = pids[grid[:, 0]]
    vp, we, il = grid[:, 1], grid[:, 2], grid[:, 3]
    sc = rng.integers(1, 10, size=len(grid))
    del grid

    def pad(a: np.ndarray, width: int) -> pa.Array:
        return pc.utf8_lpad(pc.cast(pa.array(a), pa.string()), width, "0")

    p4 = pad(pid, 4)
    name = pc.binary_join_element_wise("FineGPR/", p4, "/", p4, "_c", pad(vp, 2), "_w", pad(we, 2), "_l", pad(il, 2),
                                       "_p", pad(sc, 2), ".jpg", "")
    manifest = pd.DataFrame({
        "image_id": pd.Series(name.to_pandas(types_mapper=None)).astype("str"),
        "split": "train", "pid": pid, "camid": vp - 1, "dataset": "finegpr",
        "viewpoint": vp, "weather": we, "illumination": il, "scene": sc})
    return manifest, attrs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ids", type=int, default=1150)
    ap.add_argument("--per-image", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true", help="also time write_captions (parquet + COCO JSON)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    manifest, attrs = build_inputs(args.ids, args.seed)
    t_build = time.perf_counter() - t0
    rss_inputs = peak_rss_mib()
    t0 = time.perf_counter()
    result = generate_captions(manifest, attrs, per_image=args.per_image, seed=args.seed,
                               viewpoint_words=DEFAULT_VIEWPOINT_WORDS)
    t_gen = time.perf_counter() - t0
    rss_gen = peak_rss_mib()
    print(f"images={len(manifest):,} ids={args.ids} per_image={args.per_image} captions={len(result.captions):,} "
          f"unique={result.metrics['unique_captions']:,} vocab={result.metrics['vocabulary_size']} "
          f"words/caption={result.metrics['words_per_caption']}")
    print(f"build manifest: {t_build:.1f} s (peak RSS {rss_inputs:.0f} MiB)")
    print(f"generate_captions: {t_gen:.1f} s (peak RSS so far {rss_gen:.0f} MiB)")
    if args.write:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            write_captions(result, Path(tmp) / "finegpr.parquet", Path(tmp) / "finegpr_coco.json")
            t_write = time.perf_counter() - t0
            sizes = {p.name: p.stat().st_size / 2**20 for p in Path(tmp).iterdir()}
        print(f"write_captions: {t_write:.1f} s ({', '.join(f'{k} {v:.0f} MiB' for k, v in sizes.items())})")
    print(f"peak RSS: {peak_rss_mib():.0f} MiB; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus")
    return 0


if __name__ == "__main__":
    sys.exit(main())
