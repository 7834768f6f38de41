"""Feature extraction over a test loader: batched, optional flip-averaging, L2-normalised rows."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from dmf_core.eval.distances import check_finite

log = logging.getLogger(__name__)


def _images(batch) -> torch.Tensor:
    if isinstance(batch, dict):
        if "image" not in batch:
            raise ValueError(f"loader batch has no 'image' key (keys: {sorted(batch)})")
        images = batch["image"]
    elif isinstance(batch, torch.Tensor):
        images = batch
    else:
        raise ValueError(f"loader batch: expected a dict with an 'image' tensor, got {type(batch).__name__}")
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"batch['image']: expected a float tensor B x C x H x W, got {shape}")
    return images


def extract_features(embed: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, *, flip: bool = False,
                     device: str | torch.device = "cpu", desc: str = "features") -> np.ndarray:
    """Embed every batch of ``loader`` (dict batches, key ``"image"``: float B x 3 x H x W; other
    keys ignored) with ``embed`` under ``torch.inference_mode``; with ``flip``, the embedding of the
    horizontally flipped image is added before normalising (flip-averaging).

    Returns float32 ``N x D`` with L2-normalised rows, in loader order. Raises ``ValueError`` on an
    empty loader or on NaN/infinite embeddings."""
    device = torch.device(device)
    chunks: list[np.ndarray] = []
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, unit="batch", disable=None, leave=False):
            images = _images(batch).to(device=device, dtype=torch.float32, non_blocking=True)
            feats = embed(images).float()
            if flip:
                feats = feats + embed(torch.flip(images, dims=[3])).float()
            if feats.ndim != 2 or feats.shape[0] != images.shape[0]:
                raise ValueError(f"embed returned shape {tuple(feats.shape)} for a batch of {images.shape[0]} "
                                 "images; expected (batch, dim)")
            feats = torch.nn.functional.normalize(feats, p=2.0, dim=1)
            chunks.append(feats.cpu().numpy().astype(np.float32, copy=False))
    if not chunks:
        raise ValueError("extract_features: the loader yielded no batches (empty split)")
    out = np.concatenate(chunks, axis=0)
    check_finite(out, "extracted features")
    log.debug("extracted %d x %d features (flip=%s)", out.shape[0], out.shape[1], flip)
    return out
