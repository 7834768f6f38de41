"""How collapsed is f, and what would the triplet see? A diagnostic for trained models.

For each model folder, on the images of a Market-layout folder (pid = the file name's first
field; junk and distractors, pids <= 0, left out), reports for f (the fusion CLS output, what the
triplet trains) and BN(f) (the test-time feature):

* ``cos other`` / ``cos same``: mean cosine between images of different / of the same identity;
* ``shared``: the share of f's mean squared norm that is the mean f, ||mean f||^2 / mean ||f||^2
  (1: every image is the same vector; ~0: no component common to all images);
* ``satisfied``: batch-hard triplets on L2-normalised features, over P x K batches drawn from the
  folder: the share of anchors whose hardest negative is farther than their hardest positive by
  the margin (as ``triplets_satisfied`` in training, on images the model never trained on).

    python benchmarks/feature_collapse.py models/pretrain --images data/raw/sp_msmt/bounding_box_test
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dmf_core.extractor import FeatureExtractor


def market_images(folder: Path) -> tuple[list[Path], np.ndarray]:
    """Sorted images of ``folder`` whose pid (the name's first field) is positive, and their pids."""
    paths, pids = [], []
    for path in sorted(folder.glob("*.jpg")):
        pid = int(path.name.split("_", 1)[0])
        if pid > 0:
            paths.append(path)
            pids.append(pid)
    if not paths:
        raise SystemExit(f"{folder}: no Market-style images (<pid>_c<cam>...jpg)")
    return paths, np.asarray(pids)


def f_and_neck(model_dir: Path, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """f and BN(f) of every image (no flip), captured around the model's BNNeck."""
    extractor = FeatureExtractor.from_pretrained(model_dir, flip=False)
    captured: list[torch.Tensor] = []
    hook = extractor.model.head.bnneck.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0].cpu()))
    try:
        neck = extractor([str(p) for p in paths], progress=False)
    finally:
        hook.remove()
    return torch.cat(captured).double(), neck.double()


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
              seed: int = 0) -> float:
    """Share of anchors satisfied by batch-hard mining over ``batches`` random P x K batches."""
    rng = np.random.default_rng(seed)
    f = F.normalize(feats, dim=1)
    by_pid = {pid: np.flatnonzero(pids == pid) for pid in np.unique(pids)}
    eligible = [pid for pid, idx in by_pid.items() if len(idx) >= 2]
    hits = total = 0
    for _ in range(batches):
        chosen = rng.choice(eligible, size=min(P, len(eligible)), replace=False)
        idx = np.concatenate([rng.choice(by_pid[pid], size=K, replace=len(by_pid[pid]) < K) for pid in chosen])
        x, lab = f[idx], torch.as_tensor(pids[idx])
        dist = torch.cdist(x, x)
        same = lab[:, None] == lab[None, :]
        hardest_pos = dist.masked_fill(~same, float("-inf")).amax(1)
        hardest_neg = dist.masked_fill(same, float("inf")).amin(1)
        hits += int((hardest_neg > hardest_pos + margin).sum())
        total += len(idx)
    return hits / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", type=Path, nargs="+", help="model folders (models/pretrain, ...)")
    ap.add_argument("--images", type=Path, required=True, help="a Market-layout image folder")
    ap.add_argument("--P", type=int, default=16)
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--margin", type=float, default=0.3)
    ap.add_argument("--batches", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    paths, pids = market_images(args.images)
    print(f"{len(paths)} images of {len(np.unique(pids))} identities in {args.images}; "
          f"batch-hard over {args.batches} batches of {args.P} x {args.K}, margin {args.margin}\n")
    print("| model | feature | cos other | cos same | shared | satisfied |\n|---|---|---:|---:|---:|---:|")
    for model_dir in args.models:
        for name, feats in zip(("f", "BN(f)"), f_and_neck(model_dir, paths)):
            other, same = cosines(feats, pids)
            sat = satisfied(feats, pids, args.P, args.K, args.margin, args.batches)
            print(f"| {model_dir} | {name} | {other:.4f} | {same:.4f} | {shared_share(feats):.4f} | {sat:.3f} |")


if __name__ == "__main__":
    main()
