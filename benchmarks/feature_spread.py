"""Has a model collapsed its features? Spread of f over one batch of a packed split.

For each model folder: the mean cosine similarity between the f of different images, and the
share of f's energy that varies between images, ``E||f - mean f||^2 / E||f||^2`` (1: no shared
component; 0: every image maps to the same point). Used to diagnose shared-mode pretraining
(docs/training.md, "Shared vs image-only on the demo").

    python benchmarks/feature_spread.py models/pretrain models/sp_market --split sp_cuhk/query
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dmf_core import paths
from dmf_core.config import config_from_dict
from dmf_core.data.loading.loader import build_test_loader
from dmf_core.model.build import DMFModel


def spread(model_dir: Path, lmdb: Path, batch: int) -> dict:
    model, meta = DMFModel.from_pretrained(model_dir)
    model.eval()
    cfg = config_from_dict(meta["config"])
    img = cfg.model.image
    images = next(iter(build_test_loader(lmdb, cfg.augment, img.height, img.width, batch, 0)))["image"]
    with torch.inference_mode():
        f = model.embed_images(images).float()
    unit = torch.nn.functional.normalize(f, dim=1)
    off_diagonal = (unit @ unit.t())[~torch.eye(len(f), dtype=torch.bool)]
    varying = (f - f.mean(0)).pow(2).sum(1).mean() / f.pow(2).sum(1).mean()
    return {"model": str(model_dir), "images": len(f), "mean_cosine": round(float(off_diagonal.mean()), 5),
            "varying_share": round(float(varying), 5), "norm": round(float(f.norm(dim=1).mean()), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--split", default="sp_cuhk/query", help="<dataset>/<split> of a packed LMDB")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    dataset, split = args.split.split("/")
    for model_dir in args.models:
        print(json.dumps(spread(model_dir, paths.lmdb_path(dataset, split), args.batch)))


if __name__ == "__main__":
    main()
