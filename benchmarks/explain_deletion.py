"""Which map says where a model looks? The deletion test of ``dmf explain``'s maps.

For each image, mask (set to the model's mean colour) the k patches a map ranks highest, the k it
ranks lowest and k random ones, and measure how far the retrieval feature moves (cosine distance
to the unmasked image's feature). A map that means something: top >> random >> bottom.

Maps compared: the two of ``dmf explain`` (``gradient``: gradient x input of random directions of
the feature, squared; ``rollout``: attention rollout through the ViT and the fusion CLS), two
common gradient maps with the feature's norm as the target (``gradxinput_norm``: |gradient x
input| per patch; ``gradcam_norm``: Grad-CAM on the ViT's output tokens), and ``occlusion``, the
single-patch deletion itself (N + 1 forward passes: a reference the others approximate, not a
candidate for ranked lists).

    python benchmarks/explain_deletion.py models/pretrain --split sp_market/query --images 128
    python benchmarks/explain_deletion.py --tiny 0 1     # the tiny model of tests/test_explain.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from dmf_core.eval import explain

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("gradient", "rollout", "gradxinput_norm", "gradcam_norm", "occlusion")


def _norm_gradient(model, images: torch.Tensor, at_tokens: bool) -> torch.Tensor:
    """Gradient of ||BN(f)|| w.r.t. the input pixels (x) or the ViT's output tokens (A): (B, gh, gw)
    maps |sum over the patch of grad * x|, or Grad-CAM relu(sum_c mean_i(dA_ic) A_ic)."""
    (gh, gw), patch, stride = explain.grid_of(model)
    tokens = []
    hook = model.image_encoder.register_forward_hook(lambda _m, _i, out: tokens.append(out))
    try:
        x = images.detach().clone().requires_grad_(not at_tokens)
        with torch.enable_grad():
            norm = model.embed_images(x).float().norm(dim=1).sum()
            if at_tokens:
                (grad,) = torch.autograd.grad(norm, tokens[0])
                act = tokens[0].detach()
                cam = (grad[:, 1:].mean(1, keepdim=True) * act[:, 1:]).sum(-1).clamp(min=0)
                return cam.reshape(len(images), gh, gw)
            (grad,) = torch.autograd.grad(norm, x)
    finally:
        hook.remove()
    return explain.patch_sums((grad * x.detach()).sum(1), patch, stride).abs()


def occlusion_map(model, images: torch.Tensor) -> torch.Tensor:
    """Cosine distance of the feature when each patch alone is masked: (B, gh, gw)."""
    (gh, gw), _, _ = explain.grid_of(model)
    base = explain.embed(model, images)
    out = torch.zeros(len(images), gh * gw)
    for t in range(gh * gw):
        masked = explain.mask_patches(images, torch.full((len(images), 1), t), model)
        out[:, t] = 1.0 - (explain.embed(model, masked) * base).sum(1)
    return out.reshape(len(images), gh, gw)


def maps_of(model, images: torch.Tensor, method: str) -> torch.Tensor:
    if method in explain.METHODS:
        return explain.patch_maps(model, images, method)
    if method == "occlusion":
        return occlusion_map(model, images)
    return _norm_gradient(model, images, at_tokens=method == "gradcam_norm")


def compare(model, images: torch.Tensor, fractions: list[float], methods=METHODS) -> list[dict]:
    """One row per (method, fraction): mean top / random / bottom distance, the share of images
    with top > bottom, and the map's time per image."""
    rows = []
    for method in methods:
        started = time.perf_counter()
        maps = maps_of(model, images, method)
        per_image_ms = 1e3 * (time.perf_counter() - started) / len(images)
        for fraction in fractions:
            d = explain.deletion_distances(model, images, maps, fraction)
            rows.append({"method": method, "fraction": fraction, "top": round(float(d["top"].mean()), 4),
                         "random": round(float(d["random"].mean()), 4),
                         "bottom": round(float(d["bottom"].mean()), 4),
                         "top_over_bottom": round(float(d["top"].mean() / max(d["bottom"].mean(), 1e-9)), 1),
                         "top_gt_bottom": round(float((d["top"] > d["bottom"]).mean()), 3),
                         "ms_per_image": round(per_image_ms, 1)})
    return rows


def split_images(model_dir: Path, split: str, count: int) -> tuple[object, torch.Tensor]:
    """The model and the first ``count`` images of a packed split, through the evaluation's test loader."""
    from dmf_core import paths
    from dmf_core.config import AugmentConfig
    from dmf_core.data.loading.loader import build_test_loader
    from dmf_core.model.build import DMFModel

    model, _ = DMFModel.from_pretrained(model_dir)
    config = model.config()
    augment = AugmentConfig(flip=0.0, pad=0, erasing=0.0, mean=config["image_mean"], std=config["image_std"])
    lmdb = Path(split) if split.endswith(".lmdb") else paths.lmdb_path(*split.split("/"))
    images = next(iter(build_test_loader(lmdb, augment, *config["image_size"], count, 0)))["image"]
    return model.eval(), images


def tiny(seed: int, count: int) -> tuple[object, torch.Tensor]:
    """The deletion test's model of tests/test_explain.py (trained here, in a temporary folder) and
    its held-out images."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_explain import synthped_split, train_tiny_model

    from dmf_core.model.build import DMFModel

    work = Path(tempfile.mkdtemp(prefix="explain_tiny_"))
    (train_x, train_pids), (test_x, _), _ = synthped_split(work / "synthped")
    model_dir = train_tiny_model(work / f"seed{seed}", train_x, train_pids, seed=seed)
    return DMFModel.from_pretrained(model_dir)[0].eval(), test_x[:count]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", type=Path, help="model folders (models/<row>)")
    ap.add_argument("--split", default="sp_market/query", help="<dataset>/<split> of a packed LMDB, or a .lmdb")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    ap.add_argument("--tiny", type=int, nargs="*", metavar="SEED", help="the test's tiny model, these seeds")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = [(str(m), lambda m=m: split_images(m, args.split, args.images)) for m in args.models]
    cases += [(f"tiny seed {s}", lambda s=s: tiny(s, args.images)) for s in args.tiny or []]
    for name, load in cases:
        model, images = load()
        for row in compare(model, images, args.fractions, args.methods):
            print(json.dumps({"model": name, "images": len(images), **row}), flush=True)


if __name__ == "__main__":
    main()
