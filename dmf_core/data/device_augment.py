"""Decode and augment a training batch on the training device (``train.decode: device``).

On a GPU the CPU workers that decode JPEGs and augment them one image at a time can become the
ceiling of a step. Here the loader's workers only read the stored bytes (``encoded=True`` in
:func:`~dmf_core.data.loader.build_train_loader`); :class:`BatchAugment` decodes the whole batch
with ``torchvision.io.decode_jpeg`` on the device (nvJPEG on CUDA) and applies resize, flip,
pad + random crop, normalisation and random erasing as batched tensor operations.

Each image's random choices are drawn in the workers (cheap, off the training thread) by
:func:`~dmf_core.data.loader.draw_augment` with a generator seeded by the item's own seed, the
function and the seed the worker path uses, and travel with the batch as a (B, 7) tensor: on
the CPU both paths give the same tensors bit for bit (tests/test_device_augment.py); on CUDA the
decoder and the resize kernels may differ from the CPU's by rounding.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from dmf_core.data.loader import ReidTrainAugment, decode_to_tensor

warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

JPEG_MAGIC = b"\xff\xd8"


class BatchAugment:
    """``(encoded, augment) -> float (B, 3, H, W)`` on ``device``: the training transform of
    :class:`~dmf_core.data.loader.ReidTrainAugment`, batched, with the random choices the
    loader's workers drew."""

    def __init__(self, height: int, width: int, augment, device: torch.device | str):
        self.device = torch.device(device)
        self.chain = ReidTrainAugment(height, width, augment.flip, augment.pad, augment.erasing,
                                      augment.mean, augment.std)
        self.size = self.chain.size
        self.scale = self.chain.scale.to(self.device)
        self.shift = self.chain.shift.to(self.device)

    def decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        """uint8 3xHxW per image on the device; what is not a JPEG is decoded on the CPU."""
        jpeg = [i for i, data in enumerate(encoded) if bytes(data[:2].tolist()) == JPEG_MAGIC]
        out: list[torch.Tensor | None] = [None] * len(encoded)
        if jpeg:
            decoded = decode_jpeg([encoded[i] for i in jpeg], mode=ImageReadMode.RGB, device=self.device)
            for i, image in zip(jpeg, decoded):
                out[i] = image
        for i, image in enumerate(out):
            if image is None:
                out[i] = decode_to_tensor(bytes(encoded[i].tolist())).to(self.device)
        return out

    def resize(self, images: list[torch.Tensor]) -> torch.Tensor:
        """One uint8 (B, 3, H, W) batch at the model's size (images of one size in one call)."""
        H, W = self.size
        out = torch.empty((len(images), 3, H, W), dtype=torch.uint8, device=self.device)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(tuple(image.shape[-2:]), []).append(i)
        for size, idx in by_size.items():
            group = torch.stack([images[i] for i in idx])
            if size != (H, W):
                group = v2.functional.resize(group, [H, W], antialias=True)
            out[idx] = group
        return out

    def __call__(self, encoded: list[torch.Tensor], augment: torch.Tensor) -> torch.Tensor:
        """``augment``: (B, 7) int64, each row an :meth:`AugmentDraw.as_tensor` made in the workers."""
        images = self.resize(self.decode(encoded))
        B, (H, W), p = len(images), self.size, self.chain.pad
        flip, dy, dx, top, left, h, w = augment.to(self.device).unbind(1)
        images = torch.where(flip.bool()[:, None, None, None], images.flip(-1), images)
        ys = torch.arange(H, device=self.device)[None, :]
        xs = torch.arange(W, device=self.device)[None, :]
        if p > 0:  # pad with 0 and take each image's crop by index
            padded = F.pad(images, (p, p, p, p))
            rows, cols = dy[:, None] + ys, dx[:, None] + xs
            b = torch.arange(B, device=self.device)[:, None, None]
            images = padded[b, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        out = images.float() * self.scale - self.shift
        in_rows = (ys >= top[:, None]) & (ys < (top + h)[:, None])  # no box: h = w = 0, nothing erased
        in_cols = (xs >= left[:, None]) & (xs < (left + w)[:, None])
        erase = in_rows[:, :, None] & in_cols[:, None, :]
        return out.masked_fill(erase[:, None], 0.0).contiguous()
