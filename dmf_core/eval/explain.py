"""Where a trained model looks: a map over the ViT's patch grid of how much each patch of an image
moves its retrieval feature (e = BN(f) L2-normalised, :meth:`DMFModel.embed_images`).

Images come as the model sees them: float (B, 3, H, W) at its input size, normalised with its
mean/std (the evaluation's test transform). Two maps, (B, gh, gw), non-negative:

- ``gradient`` (the default): gradient x input summed over each patch, for the feature's
  direction. For a random direction r, ``<d(r.e)/dx, x>`` over patch i is the first-order change
  of ``r.e`` when the patch is replaced by the model's mean colour (0 after normalisation); its
  mean square over ``directions`` draws of r estimates ``||J_e P_i x||^2``, the squared distance
  the feature moves, which is what cosine distance measures (1 - cos = |de|^2 / 2); the map is
  its square root.
  One forward and backward pass of a batch of ``directions`` copies per image.
- ``rollout``: attention rollout (Abnar & Zuidema 2020) through the ViT blocks, then through the
  fusion encoder's blocks, read from the fusion CLS row (its own learned token and the ViT's CLS
  input left out: neither depends on the image). Heads averaged, the residual as 0.5 I.
  One forward pass.

Why ``gradient`` is the default: docs/cli.md, "Which map: the deletion test"
(:func:`deletion_distances` on the demo models; benchmarks/explain_deletion.py).
The attention weights come from forward hooks (:func:`attention_weights`): the model's code and
its normal forward pass (``F.scaled_dot_product_attention``) are not touched.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("gradient", "rollout")
DEFAULT_METHOD = "gradient"
DIRECTIONS = 8  # random directions of the gradient map: 4 deleted as well as 32 on the demo model (docs/cli.md)


# ---------------------------------------------------------------------------------------------
# The patch grid
# ---------------------------------------------------------------------------------------------


def grid_of(model: nn.Module) -> tuple[tuple[int, int], int, int]:
    """((gh, gw), patch, stride) of the model's ViT."""
    vit = model.image_encoder
    return tuple(vit.grid), int(vit.init_kwargs["patch"]), int(vit.init_kwargs["stride"])


def patch_sums(pixels: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """(B, H, W) -> (B, gh, gw): the sum over each patch's pixels, as the ViT's patchifier cuts them."""
    return F.avg_pool2d(pixels[:, None], kernel_size=patch, stride=stride)[:, 0] * float(patch * patch)


def mask_patches(images: torch.Tensor, patches: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """A copy of ``images`` (normalised) with the patches ``patches`` (B, k) of the row-major grid
    set to 0: the model's mean colour, the baseline of the gradient map."""
    (_, gw), patch, stride = grid_of(model)
    out = images.clone()
    for b, row in enumerate(patches.tolist()):
        for t in row:
            y, x = (t // gw) * stride, (t % gw) * stride
            out[b, :, y:y + patch, x:x + patch] = 0.0
    return out


# ---------------------------------------------------------------------------------------------
# The maps
# ---------------------------------------------------------------------------------------------


def attention_blocks(model: nn.Module) -> list[nn.Module]:
    """The attention layers an image passes: the ViT's blocks, then the fusion encoder's."""
    return [block.attn for block in (*model.image_encoder.blocks, *model.fusion.blocks)]


@contextlib.contextmanager
def attention_weights(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While open, each forward pass appends every attention layer's softmax weights (B, heads,
    L, L) to the yielded list, in the order of :func:`attention_blocks`.

    ``F.scaled_dot_product_attention`` does not return them, so a forward hook on each layer's
    ``qkv`` Linear recomputes them from its output, split into q, k as ``Attention.forward``
    splits it: softmax(q k^T / sqrt(head dim)), SDPA's default scale. Image sequences carry no
    mask. Nothing else changes: the hooks only read, and are removed on exit."""
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, qkv: torch.Tensor, heads: int) -> None:
        b, n, c3 = qkv.shape
        q, k, _ = qkv.detach().reshape(b, n, 3, heads, c3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
        captured.append(torch.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1))

    handles = [attn.qkv.register_forward_hook(functools.partial(hook, heads=attn.heads))
               for attn in attention_blocks(model)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _rollout(layers: list[torch.Tensor]) -> torch.Tensor:
    """Product of the head-averaged attentions with the residual mixed in as 0.5 I, rows summing to 1."""
    out = None
    for attn in layers:
        a = attn.float().mean(1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(-1, keepdim=True)
        out = a if out is None else a @ out
    return out


def rollout_map(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Attention rollout from the fusion CLS to the ViT's input patches, (B, gh, gw)."""
    (gh, gw), _, _ = grid_of(model)
    with torch.no_grad(), attention_weights(model) as layers:
        model.encode_images(images)
    depth = len(model.image_encoder.blocks)
    vit, fusion = _rollout(layers[:depth]), _rollout(layers[depth:])
    # fusion tokens: [its CLS, the ViT's output tokens (CLS, patches)]; ViT tokens: [CLS, patches]
    from_cls = torch.einsum("bj,bjk->bk", fusion[:, 0, 1:], vit)
    return from_cls[:, 1:].reshape(len(images), gh, gw)


def gradient_map(model: nn.Module, images: torch.Tensor, directions: int = DIRECTIONS, seed: int = 0,
                 chunk: int = 256) -> torch.Tensor:
    """Root mean square over ``directions`` seeded random directions r of the gradient x input of
    r.e summed over each patch, (B, gh, gw): how far the feature moves per patch (estimated). The
    same directions for every image (its map does not depend on the batch); ``chunk`` rows
    (image copies) per backward pass."""
    (gh, gw), patch, stride = grid_of(model)
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(directions, model.feature_dim, generator=gen).to(images.device)
    per_pass = max(1, chunk // directions)
    maps = []
    for batch in images.detach().split(per_pass):
        x = batch.repeat_interleave(directions, dim=0).requires_grad_(True)
        with torch.enable_grad():
            e = F.normalize(model.embed_images(x).float(), dim=1)
            (grad,) = torch.autograd.grad((e * r.repeat(len(batch), 1)).sum(), x)
        contrib = patch_sums((grad * x.detach()).sum(1), patch, stride)  # (b * directions, gh, gw)
        maps.append(contrib.reshape(len(batch), directions, gh, gw).pow(2).mean(1).sqrt())
    return torch.cat(maps)


def patch_maps(model: nn.Module, images: torch.Tensor, method: str = DEFAULT_METHOD) -> torch.Tensor:
    """The ``method`` map of every image, (B, gh, gw) float32 on the CPU; the model in eval mode."""
    if method not in METHODS:
        raise ValueError(f"map method {method!r}; expected one of {', '.join(METHODS)}")
    model.eval()
    images = images.float()
    maps = rollout_map(model, images) if method == "rollout" else gradient_map(model, images)
    return maps.float().cpu()


# ---------------------------------------------------------------------------------------------
# What a map means: the deletion test
# ---------------------------------------------------------------------------------------------


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The retrieval feature: BN(f), L2-normalised."""
    with torch.no_grad():
        return F.normalize(model.embed_images(images).float(), dim=1)


def deletion_distances(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, fraction: float = 0.25,
                       seed: int = 0) -> dict[str, np.ndarray]:
    """Cosine distance (1 - cos) from each image's feature to its feature with k = ``fraction`` of
    its patches masked (:func:`mask_patches`): the k the map ranks highest (``top``), the k it
    ranks lowest (``bottom``), k chosen at random (``random``, seeded). A map that says where the
    feature comes from gives top > random > bottom."""
    flat = maps.reshape(len(maps), -1)
    k = max(1, int(round(fraction * flat.shape[1])))
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    gen = torch.Generator().manual_seed(seed)
    chosen = {"top": order[:, :k], "bottom": order[:, -k:],
              "random": torch.stack([torch.randperm(flat.shape[1], generator=gen)[:k] for _ in flat])}
    base = embed(model, images)
    return {name: (1.0 - (embed(model, mask_patches(images, idx, model)) * base).sum(1)).numpy()
            for name, idx in chosen.items()}


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def heat_overlay(image, heat, alpha: float = 0.5, cmap: str = "jet"):
    """An RGB PIL image: ``image`` (PIL) with ``heat`` ((gh, gw), any scale) stretched to [0, 1],
    resized bilinearly to the image and drawn over it in ``cmap`` with opacity ``alpha``."""
    import matplotlib
    from PIL import Image

    heat = np.asarray(heat, dtype=np.float32)
    lo, hi = float(heat.min()), float(heat.max())
    heat = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    rgb = image.convert("RGB")
    big = np.asarray(Image.fromarray(heat, mode="F").resize(rgb.size, Image.Resampling.BILINEAR))
    colours = matplotlib.colormaps[cmap](np.clip(big, 0.0, 1.0))[..., :3]
    blend = (1 - alpha) * np.asarray(rgb, dtype=np.float32) / 255.0 + alpha * colours
    return Image.fromarray(np.clip(blend * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")


def map_loader(model: nn.Module, load_input, load_image, method: str = DEFAULT_METHOD):
    """``load_map(kind, index)`` for the ranked-list pictures (:func:`~dmf_core.eval.visualise.
    plot_ranked_list`): the PIL image ``load_image(kind, index)`` with the ``method`` map of
    ``load_input(kind, index)`` (the same image as the model sees it, normalised 3 x H x W) over it."""
    device = next(model.parameters()).device

    def load_map(kind: str, index: int):
        x = load_input(kind, index).to(device, torch.float32)[None]
        return heat_overlay(load_image(kind, index), patch_maps(model, x, method)[0].numpy())

    return load_map


def plot_explanations(images: list, maps: list, out_png, *, titles: list[str] | None = None,
                      method: str = DEFAULT_METHOD, column_inches: float = 1.1):
    """The images with their ``method`` maps over them (each stretched from its lowest patch, blue,
    to its highest, red): one image as a pair side by side, several as a row of images over a row
    of maps. A palette PNG (:func:`~dmf_core.eval.visualise.save_png`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dmf_core.eval.visualise import save_png

    if not images or len(images) != len(maps):
        raise ValueError(f"plot_explanations: {len(images)} images and {len(maps)} maps")
    w, h = images[0].size
    tall = column_inches * h / w
    pairs = [(image, heat_overlay(image, heat)) for image, heat in zip(images, maps)]
    if len(pairs) == 1:
        fig, axes = plt.subplots(1, 2, figsize=(2 * column_inches + 0.3, tall + 0.45), squeeze=False)
        cells = [(axes[0][0], axes[0][1])]
    else:
        fig, axes = plt.subplots(2, len(pairs), figsize=(len(pairs) * column_inches + 0.3, 2 * tall + 0.5),
                                 squeeze=False)
        cells = list(zip(axes[0], axes[1]))
    for c, ((image_ax, map_ax), (image, overlay)) in enumerate(zip(cells, pairs)):
        image_ax.imshow(image.convert("RGB"))
        map_ax.imshow(overlay)
        for ax in (image_ax, map_ax):
            ax.set_xticks([])
            ax.set_yticks([])
        if titles:
            image_ax.set_title(titles[c], fontsize=5)
    if len(pairs) == 1:
        cells[0][1].set_title(f"{method} map", fontsize=5)
    else:
        cells[0][1].set_ylabel(f"{method} map", fontsize=6)
    fig.tight_layout(pad=0.3)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, out_png, dpi=110)
    plt.close(fig)
    return out_png
