"""Packing speed: original bytes of N JPEGs (Market-sized by default) into one LMDB.

    .venv/bin/python benchmarks/pack_speed.py [--images 6000] [--height 128] [--width 64]

Prints one JSON line: images/s of pack_split (read + full decode check + sha1 + LMDB write +
sidecar), and whether two builds are byte-identical. Target: >= 2,000 images/s on the 2-core box.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dmf_core.data.store.lmdb_store import pack_split  # noqa: E402


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth colour regions + mild noise: JPEG sizes close to real re-ID crops (~3-5 KB at 128x64)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        a, b, ph = rng.uniform(0.02, 0.12, 3)
        img[..., c] = 128 + 60 * np.sin(a * yy + ph * 6) * np.cos(b * xx)
    body = (np.abs(xx - width / 2) < width * rng.uniform(0.15, 0.3)) & (yy > height * 0.1)
    img[body] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 10, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_folder(root: Path, n: int, height: int, width: int, ids: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        pid = i % ids
        rel = f"{pid:04d}/{pid:04d}_c{i % 6 + 1}s1_{i:06d}_00.jpg"
        path = root / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(photo_like(rng, height, width)).save(path, quality=90)
        rows.append({"image_id": rel, "split": "train", "pid": pid, "camid": i % 6, "dataset": "bench"})
    return pd.DataFrame(rows)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the generated images here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        root = work / "raw"
        rows = make_folder(root, args.images, args.height, args.width)
        src_bytes = sum((root / r).stat().st_size for r in rows["image_id"])
        rates, hashes = [], []
        for k in range(args.repeats):
            out = work / f"lmdb{k}" / "bench-train.lmdb"
            rep = pack_split(rows, root, out, relabel=True, params_fingerprint={"resize": None})
            rates.append(rep.count / rep.seconds)
            hashes.append(sha256(out))
            size = out.stat().st_size
        print(json.dumps({
            "images": args.images, "size": [args.height, args.width],
            "mean_jpeg_bytes": round(src_bytes / args.images),
            "images_per_s": [round(r) for r in rates], "best_images_per_s": round(max(rates)),
            "lmdb_bytes": size, "lmdb_over_source": round(size / src_bytes, 2),
            "byte_identical": len(set(hashes)) == 1, "cpus": os.cpu_count(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
        }))


if __name__ == "__main__":
    main()
