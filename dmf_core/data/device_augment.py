"""Decode and augment a training batch on the training device (``train.decode: device``).

On a GPU the CPU workers that decode JPEGs and augment them one image at a time can become the
ceiling of a step. Here the loader's workers only read the stored bytes (``encoded=True`` in
:func:`~dmf_core.data.loader.build_train_loader`); :class:`BatchAugment` decodes the whole batch
with ``torchvision.io.decode_jpeg`` on the device (nvJPEG on CUDA) and applies resize, flip,
pad + random crop, normalisation and random erasing as batched tensor operations.

Each image's random choices come from :func:`~dmf_core.data.loader.draw_augment` with a CPU
generator seeded by the item's own seed, the function and the seed the worker path uses: on the
CPU both paths give the same tensors bit for bit (tests/test_device_augment.py); on CUDA the
decoder and the resize kernels may differ from the CPU's by rounding.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from dmf_core.data.loader import AugmentDraw, ReidTrainAugment, decode_to_tensor

warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

JPEG_MAGIC = b"\xff\xd8"


class BatchAugment:
    """``(encoded, seeds) -> float (B, 3, H, W)`` on ``device``: the training transform of
    :class:`~dmf_core.data.loader.ReidTrainAugment`, batched."""

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

    def draws(self, seeds: torch.Tensor | list[int]) -> list[AugmentDraw]:
        generator = torch.Generator()
        draws = []
        for seed in torch.as_tensor(seeds).tolist():
            generator.manual_seed(int(seed))
            draws.append(self.chain.draw(generator))
        return draws

    def __call__(self, encoded: list[torch.Tensor], seeds: torch.Tensor | list[int]) -> torch.Tensor:
        images = self.resize(self.decode(encoded))
        draws = self.draws(seeds)
        B, (H, W), p = len(images), self.size, self.chain.pad
        flips = torch.tensor([d.flip for d in draws], device=self.device)
        images = torch.where(flips[:, None, None, None], images.flip(-1), images)
        if p > 0:  # pad with 0 and take each image's crop by index
            padded = F.pad(images, (p, p, p, p))
            rows = torch.tensor([d.dy for d in draws], device=self.device)[:, None] + torch.arange(H, device=self.device)
            cols = torch.tensor([d.dx for d in draws], device=self.device)[:, None] + torch.arange(W, device=self.device)
            b = torch.arange(B, device=self.device)[:, None, None]
            images = padded[b, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        out = images.float() * self.scale - self.shift
        boxes = [(n, d.box) for n, d in enumerate(draws) if d.box is not None]
        if boxes:
            erase = torch.zeros((B, H, W), dtype=torch.bool, device=self.device)
            for n, (i, j, h, w) in boxes:
                erase[n, i:i + h, j:j + w] = True
            out = out.masked_fill(erase[:, None], 0.0)
        return out.contiguous()
