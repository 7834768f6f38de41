"""Decode and augment a training batch on the training device (``train.decode: device``).

On a GPU the CPU workers that decode JPEGs and augment them one image at a time can become the
ceiling of a step. Here the loader's workers only read the stored bytes (``encoded=True`` in
:func:`~dmf_core.data.loading.loader.build_train_loader`); :class:`BatchAugment` decodes the whole batch
with nvJPEG on CUDA (``torchvision.io.decode_jpeg``; on the CPU TorchCodec's ``decode_jpeg``,
the worker path's decoder) and applies resize, flip,
pad + random crop, normalisation and random erasing as batched tensor operations. The
workers send one flat byte tensor per batch (not one per image: fewer shared-memory segments).

Each image's random choices are drawn in the workers (cheap, off the training thread) by
:func:`~dmf_core.data.loading.loader.draw_augment` with a generator seeded by the item's own seed, the
function and the seed the worker path uses, and travel with the batch as a (B, 7) tensor: on
the CPU both paths give the same tensors bit for bit (tests/test_device_augment.py); on CUDA the
decoder and the resize kernels may differ from the CPU's by rounding.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchcodec.decoders import decode_jpeg as _codec_decode_jpeg
from torchvision.io import ImageReadMode
from torchvision.io import decode_jpeg as _tv_decode_jpeg
from torchvision.transforms import v2

from dmf_core.data.loading.loader import ReidTrainAugment, decode_to_tensor, may_hold_exif

JPEG_MAGIC = b"\xff\xd8"
# What torchvision 0.29 warns on every call of its codecs (deprecated in favour of TorchCodec).
_TV_DEPRECATED = "The image decoding and encoding capabilities of TorchVision are deprecated"
log = logging.getLogger(__name__)


class BatchAugment:
    """``batch -> float (B, 3, H, W)`` on ``device``: the training transform of
    :class:`~dmf_core.data.loading.loader.ReidTrainAugment`, batched, with the random choices the
    loader's workers drew. ``batch`` is what an ``encoded=True`` loader yields: ``encoded`` (every
    image's stored bytes, concatenated), ``encoded_lengths``, ``augment`` (B x 7) and ``index``;
    ``name_of(index)`` names an image in a decode error."""

    def __init__(self, height: int, width: int, augment, device: torch.device | str,
                 name_of: Callable[[int], str] | None = None):
        self.device = torch.device(device)
        self.chain = ReidTrainAugment(height, width, augment.flip, augment.pad, augment.erasing,
                                      augment.mean, augment.std)
        self.size = self.chain.size
        self.scale = self.chain.scale.to(self.device)
        self.shift = self.chain.shift.to(self.device)
        self.name_of = name_of or (lambda index: f"training image {index}")
        self._warned_cpu = False
        self._stream: torch.cuda.Stream | None = None  # CUDA: where nvJPEG's outputs are allocated

    def decode(self, encoded: list[torch.Tensor], index: list[int]) -> list[torch.Tensor]:
        """uint8 3xHxW per image on the device. JPEGs in one batched call; what that decoder
        refuses, and what is not a JPEG, one by one through the worker path's decoder. On the CPU a
        JPEG that may hold EXIF goes that way too (TorchCodec would turn it by its orientation, the
        worker path does not: :func:`~dmf_core.data.loading.loader.may_hold_exif`); nvJPEG ignores EXIF."""
        cuda = self.device.type == "cuda"
        jpeg = [k for k, data in enumerate(encoded) if data[:2].numpy().tobytes() == JPEG_MAGIC
                and (cuda or not may_hold_exif(data.numpy().tobytes()))]
        out: list[torch.Tensor | None] = [None] * len(encoded)
        try:
            decoded = self._decode_batch([encoded[k] for k in jpeg]) if jpeg else []
        except RuntimeError:
            decoded = [None] * len(jpeg)  # one bad image fails the whole call: retry one by one below
        for k, image in zip(jpeg, decoded):
            out[k] = image
        for k, image in enumerate(out):
            if image is None:
                out[k] = self._decode_one(encoded[k], index[k], is_jpeg=k in jpeg)
        return out

    def _decode_batch(self, jpegs: list[torch.Tensor]) -> list[torch.Tensor]:
        """nvJPEG decodes on its own stream into memory allocated on the current one, without
        waiting for it. On the training stream, kernels still queued from the last step could be
        using those blocks; so the output is allocated on a stream of its own (whose blocks no step
        kernel touches), and each image is marked as used by the training stream, so that its
        block is not handed out again before the step that reads it has run. Nothing here waits
        for the training stream (torchvision still waits for its own decode), so the next batch
        decodes while the GPU runs the last step."""
        if self.device.type != "cuda":  # the worker path's decoder: the same pixels
            return [_codec_decode_jpeg(data, mode="RGB").to(self.device) for data in jpegs]
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        training = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            decoded = _nvjpeg_decode(jpegs, self.device)
        training.wait_stream(self._stream)
        for image in decoded:
            image.record_stream(training)
        return decoded

    def _decode_one(self, data: torch.Tensor, index: int, is_jpeg: bool) -> torch.Tensor:
        if is_jpeg:
            try:
                return self._decode_batch([data])[0]
            except RuntimeError:
                pass
        if not self._warned_cpu:
            log.warning("train.decode=device: %s is decoded on the CPU (not a JPEG, or refused by the device's "
                        "decoder); with many such images train.decode=worker is faster", self.name_of(index))
            self._warned_cpu = True
        return decode_to_tensor(data.numpy().tobytes(), self.name_of(index)).to(self.device)

    def resize(self, images: list[torch.Tensor]) -> torch.Tensor:
        """One uint8 (B, 3, H, W) batch at the model's size (images of one size in one call)."""
        H, W = self.size
        by_size: dict[tuple[int, int], list[int]] = {}
        for k, image in enumerate(images):
            by_size.setdefault(tuple(image.shape[-2:]), []).append(k)
        groups = {}
        for size, idx in by_size.items():
            group = torch.stack([images[k] for k in idx])
            groups[size] = group if size == (H, W) else v2.functional.resize(group, [H, W], antialias=True)
        if len(groups) == 1:
            return next(iter(groups.values()))  # one size: the batch in order, no index copy
        out = torch.empty((len(images), 3, H, W), dtype=torch.uint8, device=self.device)
        for size, idx in by_size.items():
            rows = torch.as_tensor(idx)
            if self.device.type == "cuda":  # from pinned memory: a pageable copy waits for the GPU
                rows = rows.pin_memory().to(self.device, non_blocking=True)
            out.index_copy_(0, rows, groups[size])
        return out

    def __call__(self, batch: dict) -> torch.Tensor:
        encoded = list(batch["encoded"].split(batch["encoded_lengths"].tolist()))
        images = self.resize(self.decode(encoded, batch["index"].tolist()))
        B, (H, W), p = len(images), self.size, self.chain.pad
        draws = batch["augment"]
        if self.device.type == "cuda" and not draws.is_pinned():
            draws = draws.pin_memory()
        flip, dy, dx, top, left, h, w = draws.to(self.device, non_blocking=True).unbind(1)
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


def _nvjpeg_decode(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's batched nvJPEG decode. TorchCodec's ``decode_jpeg(..., device="cuda")`` is to
    replace it once a GPU shows it gives the same pixels (``benchmarks/decoder_check.py``;
    docs/data_path.md, "Image decoder"): it uses nvJPEG too, but decodes on the current stream and
    applies EXIF orientations. Until then torchvision's deprecation warning, raised on every call,
    is ignored for this call only (here, on the training thread; not in any thread pool)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TV_DEPRECATED, category=DeprecationWarning)
        return _tv_decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
