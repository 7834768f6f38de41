"""How collapsed is f, and what would the triplet see? A diagnostic for trained models.

For each model folder, on the images of a Market-layout folder (pid = the file name's first
field; junk and distractors, pids <= 0, left out), reports for f (the fusion CLS output, what the
triplet trains) and BN(f) (the test-time feature):

* ``cos other`` / ``cos same``: mean cosine between images of different / of the same identity;
* ``shared``: the share of the features' mean squared norm that is their mean, ||mean f||^2 /
  mean ||f||^2, on the raw features (1: every image is the same vector; ~0: nothing common);
* ``satisfied``: training's batch-hard triplet (``dmf_core.train.losses.batch_hard``; L2-normalised,
  or centred with ``--triplet-feature centred``) over P x K batches drawn from the folder: the share
  of anchors whose hardest negative is at least the margin farther than their hardest positive
  (``triplets_satisfied`` of training, on images the model never trained on).

    python benchmarks/feature_collapse.py models/pretrain --images data/raw/sp_msmt/bounding_box_test
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from eval_noise import market_split  # benchmarks/, on the path when run as a script

from dmf_core.extractor import FeatureExtractor
from dmf_core.train.losses import batch_hard, triplet_gap


def market_images(folder: Path) -> tuple[list[str], np.ndarray]:
    """The folder's images with a person's pid (> 0: distractors out too), as the evaluation names them."""
    paths, pids, _cams = market_split(folder)
    keep = pids > 0
    if not keep.any():
        raise SystemExit(f"{folder}: no Market-style images (<pid>_c<cam>...jpg)")
    return [p for p, k in zip(paths, keep) if k], pids[keep]


def f_and_neck(model_dir: Path, paths: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """f and BN(f) of every image (no flip, not normalised), captured around the model's BNNeck."""
    extractor = FeatureExtractor.from_pretrained(model_dir, flip=False)
    f, neck = [], []

    def capture(_module, inputs, output) -> None:
        f.append(inputs[0].cpu())
        neck.append(output.cpu())

    hook = extractor.model.head.bnneck.register_forward_hook(capture)
    try:
        extractor(paths, progress=False)
    finally:
        hook.remove()
    return torch.cat(f).double(), torch.cat(neck).double()


def cosines(feats: torch.Tensor, pids: np.ndarray) -> tuple[float, float]:
    f = F.normalize(feats, dim=1)
    cos = f @ f.t()
    p = torch.as_tensor(pids)
    same = p[:, None] == p[None, :]
    same_pairs = same & ~torch.eye(len(p), dtype=torch.bool)
    return float(cos[~same].mean()), float(cos[same_pairs].mean())


def shared_share(feats: torch.Tensor) -> float:
    return float(feats.mean(0).pow(2).sum() / feats.pow(2).sum(1).mean())


def satisfied(feats: torch.Tensor, pids: np.ndarray, P: int, K: int, margin: float, batches: int,
              feature: str = "f", margin_type: str = "additive", seed: int = 0) -> float:
    """Share of anchors training's batch-hard triplet (``batch_hard``, ``feature`` as
    ``loss.triplet_feature``, ``margin_type`` as ``loss.triplet_margin_type``) counts as
    satisfied, over ``batches`` random P x K batches."""
    rng = np.random.default_rng(seed)
    by_pid = {pid: np.flatnonzero(pids == pid) for pid in np.unique(pids)}
    eligible = [pid for pid, idx in by_pid.items() if len(idx) >= 2]
    hits = total = 0
    for _ in range(batches):
        chosen = rng.choice(eligible, size=min(P, len(eligible)), replace=False)
        idx = np.concatenate([rng.choice(by_pid[pid], size=min(K, len(by_pid[pid])), replace=False)
                              for pid in chosen])
        d_ap, d_an, valid = batch_hard(feats[idx], torch.as_tensor(pids[idx]), feature)
        hits += int(((triplet_gap(d_ap, d_an, margin_type) + margin <= 0) & valid).sum())
        total += int(valid.sum())
    return hits / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", type=Path, nargs="+", help="model folders (models/pretrain, ...)")
    ap.add_argument("--images", type=Path, required=True, help="a Market-layout image folder")
    ap.add_argument("--P", type=int, default=16)
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--margin", type=float, default=0.3)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--triplet-feature", choices=["f", "centred", "raw"], default="f",
                    help="as loss.triplet_feature: what the triplet measures distances on")
    ap.add_argument("--margin-type", choices=["additive", "ratio"], default="additive",
                    help="as loss.triplet_margin_type: the margin on distances or on their logs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    paths, pids = market_images(args.images)
    print(f"{len(paths)} images of {len(np.unique(pids))} identities in {args.images}; "
          f"batch-hard over {args.batches} batches of {args.P} x {args.K}, {args.margin_type} margin {args.margin}\n")
    print("| model | feature | cos other | cos same | shared | satisfied |\n|---|---|---:|---:|---:|---:|")
    for model_dir in args.models:
        for name, feats in zip(("f", "BN(f)"), f_and_neck(model_dir, paths)):
            other, same = cosines(feats, pids)
            sat = satisfied(feats, pids, args.P, args.K, args.margin, args.batches, args.triplet_feature,
                            args.margin_type)
            print(f"| {model_dir} | {name} | {other:.4f} | {same:.4f} | {shared_share(feats):.4f} | {sat:.3f} |")


if __name__ == "__main__":
    main()
