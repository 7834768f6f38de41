"""A trained dmf model as a function: images -> L2-normalised test-time features.

```python
from dmf_core import FeatureExtractor

extract = FeatureExtractor.from_pretrained("models/sp_market")   # device: CUDA if available
feats = extract(["a.jpg", "b.png"])          # torch.Tensor (2, D), rows of unit length
```

The feature is the evaluation's: BN(f), the BNNeck output (running statistics) of f, the fusion
CLS output, L2-normalised (optionally flip-averaged), with the evaluation's preprocessing. Two kinds of input:

- **images**: a list (or one) of file paths, PIL images or H x W x 3 uint8 arrays. Each goes
  through the evaluation's test transform (:func:`~dmf_core.data.loading.loader.build_test_transform`:
  resize to the model's H x W, antialiased, then to float in [0, 1]); files are decoded with the
  evaluation's decoder (:func:`~dmf_core.data.loading.loader.decode_to_tensor`).
- **a float tensor** (N, 3, H, W) with values in [0, 1] at the model's input size: used as is.

Either way the batch then goes through :class:`TestTimeEncoder`, which normalises with the
model's own mean/std (``config.json``), embeds and L2-normalises. That module is also what
``dmf export`` writes as ONNX / TorchScript, so the exported graph and this class compute the same
function of the same [0, 1] input. Inputs are processed in batches (``batch_size``), with a tqdm
progress bar when there is more than one batch and stderr is a terminal.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dmf_core.config import AugmentConfig

log = logging.getLogger(__name__)

# The evaluation's test transform with an identity normalisation: uint8 3xHxW -> float [0, 1] at
# the model's size. The model's own normalisation happens in TestTimeEncoder (as in the export).
UNIT_RANGE = AugmentConfig(flip=0.0, pad=0, erasing=0.0, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
RANGE_TOLERANCE = 1e-3  # how far outside [0, 1] a float input may stray (rounding), not 0-255 data


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else the CPU; a CUDA device that is not
    available is an error (not a silent fallback)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available here (torch {torch.__version__})")
    return device


class TestTimeEncoder(nn.Module):
    """(N, 3, H, W) float in [0, 1] -> (N, D) L2-normalised BN(f): normalise with the model's
    mean/std, ``embed_images`` (+ the mirrored image's with ``flip``), L2-normalise. The exported graph."""

    def __init__(self, model: nn.Module, flip: bool = False) -> None:
        super().__init__()
        config = model.config()
        self.model = model
        self.flip = bool(flip)
        self.image_size = tuple(config["image_size"])
        self.register_buffer("mean", torch.tensor(config["image_mean"], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(config["image_std"], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        f = self.model.embed_images(x).float()
        if self.flip:
            f = f + self.model.embed_images(torch.flip(x, dims=[3])).float()
        return F.normalize(f, p=2.0, dim=1)


def _describe(item) -> str:
    if isinstance(item, np.ndarray):
        return f"array {item.shape} {item.dtype}"
    return type(item).__name__


class ImageInputs(torch.utils.data.Dataset):
    """Paths, PIL images and H x W x 3 uint8 arrays -> float [0, 1] 3 x H x W at the model's size.

    Types, array shapes and file existence are checked up front (an error before any compute);
    decoding happens per item, an unreadable file raising ValueError naming it and its index.
    """

    def __init__(self, items: Sequence, transform) -> None:
        from PIL import Image

        self.items = list(items)
        self.transform = transform
        for i, item in enumerate(self.items):
            if isinstance(item, (str, Path)):
                if not Path(item).is_file():
                    raise FileNotFoundError(f"inputs[{i}]: {item}: no such image file")
            elif isinstance(item, np.ndarray):
                if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
                    raise ValueError(f"inputs[{i}]: array of shape {item.shape} and dtype {item.dtype}; "
                                     "expected an H x W x 3 uint8 RGB image")
            elif not isinstance(item, Image.Image):
                raise TypeError(f"inputs[{i}]: {_describe(item)}; expected an image file path, a PIL image "
                                "or an H x W x 3 uint8 array (or pass one float tensor N x 3 x H x W)")

    def __len__(self) -> int:
        return len(self.items)

    def _decode(self, i: int) -> torch.Tensor:
        from PIL import Image

        from dmf_core.data.loading.loader import decode_to_tensor

        item = self.items[i]
        if isinstance(item, np.ndarray):
            return torch.from_numpy(item.copy()).permute(2, 0, 1)  # a copy: read-only arrays are fine
        if isinstance(item, Image.Image):
            rgb = item if item.mode == "RGB" else item.convert("RGB")
            return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        try:
            return decode_to_tensor(Path(item).read_bytes(), str(item))
        except Exception as exc:  # noqa: BLE001 - PIL/TorchCodec raise many types on bad data
            raise ValueError(f"inputs[{i}]: {item}: not a readable image ({exc.__class__.__name__}: {exc})") from None

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self._decode(i)).as_subclass(torch.Tensor)


def check_batch(images: torch.Tensor, size: tuple[int, int], name: str = "input tensor") -> None:
    """Raise ValueError unless ``images`` is float (N >= 1, 3, H, W) at ``size`` with values in [0, 1]."""
    h, w = size
    expected = f"expected a float tensor (N, 3, {h}, {w}) with values in [0, 1], the model's input size"
    if not images.is_floating_point():
        raise ValueError(f"{name}: dtype {images.dtype}; {expected} (uint8 pixels: x.float() / 255)")
    if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (h, w):
        hint = " (one image: add a batch dimension, x[None])" if images.ndim == 3 else ""
        hint = hint or " (another size: pass the images as a list, they are resized like the evaluation's)"
        raise ValueError(f"{name}: shape {tuple(images.shape)}; {expected}{hint}")
    if images.shape[0] == 0:
        raise ValueError(f"{name}: an empty batch (N = 0); {expected}")
    lo, hi = float(images.min()), float(images.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ValueError(f"{name}: values in [{lo:.4g}, {hi:.4g}]; {expected} (not 0-255 and not normalised: "
                         "the extractor normalises with the model's mean/std itself)")


def _batch_images(batch) -> torch.Tensor:
    """A loader batch: a tensor, or a dict whose ``"image"`` is one (the LMDB test loader's)."""
    images = batch["image"] if isinstance(batch, dict) else batch
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"batch: expected a float tensor N x 3 x H x W (or a dict with one under 'image'), "
                         f"got {_describe(images)}")
    return images


class FeatureExtractor:
    """Callable: images (see the module docstring) -> ``torch.Tensor`` (N, D) of L2-normalised BN(f).

    ``from_pretrained(model_dir)`` reads a model folder (``model.safetensors`` + ``config.json``;
    older folders with only ``meta.json`` load too). ``batch_size`` images per forward pass,
    ``flip`` adds each image's mirror (as ``evaluate.flip``), ``num_workers`` DataLoader workers
    decode image inputs. Features come back on the CPU, float32, in input order.
    """

    def __init__(self, model: nn.Module, *, device: str | torch.device | None = None, batch_size: int = 64,
                 flip: bool = False, num_workers: int = 0, meta: dict | None = None,
                 source: str | Path | None = None) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size: {batch_size}; expected a positive integer")
        self.device = resolve_device(device)
        self.encoder = TestTimeEncoder(model.eval(), flip=flip).to(self.device).eval()
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.meta = dict(meta or {})
        self.source = Path(source) if source is not None else None
        self.config = model.config()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | torch.device | None = None,
                        **kwargs) -> FeatureExtractor:
        """The model a training stage wrote (or any folder with model.safetensors + config.json)."""
        from dmf_core.model.build import DMFModel

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"{model_dir}: model folder not found (expected a folder with "
                                    "model.safetensors + config.json, e.g. models/<source>)")
        model, meta = DMFModel.from_pretrained(model_dir, device="cpu")
        return cls(model, device=device, meta=meta, source=model_dir, **kwargs)

    @property
    def model(self) -> nn.Module:
        return self.encoder.model

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the model's input."""
        return tuple(self.config["image_size"])

    @property
    def feature_dim(self) -> int:
        return int(self.config["feature_dim"])

    @property
    def flip(self) -> bool:
        return self.encoder.flip

    def transform(self):
        """uint8 3 x h x w -> float [0, 1] 3 x H x W: the evaluation's test transform, less the
        normalisation (which :class:`TestTimeEncoder` applies)."""
        from dmf_core.data.loading.loader import build_test_transform

        return build_test_transform(*self.input_size, UNIT_RANGE)

    def __call__(self, inputs, *, batch_size: int | None = None, progress: bool | None = None,
                 desc: str = "features") -> torch.Tensor:
        """Features of ``inputs``: a float tensor (N, 3, H, W) in [0, 1], or a list (or one) of
        image paths, PIL images, H x W x 3 uint8 arrays. ``progress``: None shows a bar for more
        than one batch on a terminal, True/False force it on/off."""
        from PIL import Image

        bs = int(batch_size or self.batch_size)
        if isinstance(inputs, torch.Tensor):
            check_batch(inputs, self.input_size)
            return self.embed_batches(inputs.split(bs), total=-(-len(inputs) // bs), progress=progress, desc=desc)
        if isinstance(inputs, (str, Path, Image.Image, np.ndarray)):
            inputs = [inputs]
        if not isinstance(inputs, Sequence) or isinstance(inputs, (bytes, bytearray)):
            raise TypeError(f"inputs: {_describe(inputs)}; expected a float tensor N x 3 x H x W or a list of "
                            "image paths, PIL images or H x W x 3 uint8 arrays")
        if len(inputs) == 0:
            raise ValueError("inputs: an empty list; expected at least one image (path, PIL image or "
                             "H x W x 3 uint8 array)")
        dataset = ImageInputs(inputs, self.transform())
        loader = torch.utils.data.DataLoader(dataset, batch_size=bs, shuffle=False, num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda")
        return self.embed_batches(loader, total=len(loader), progress=progress, desc=desc)

    def embed_batches(self, batches: Iterable, *, total: int | None = None, progress: bool | None = None,
                      desc: str = "features") -> torch.Tensor:
        """Features of every batch of [0, 1] images ``batches`` yields (tensors, or dicts with an
        ``"image"`` tensor such as the LMDB test loader's with :data:`UNIT_RANGE`), concatenated."""
        total = total if total is not None else (len(batches) if hasattr(batches, "__len__") else None)
        disable = (None if total is None or total > 1 else True) if progress is None else not progress
        chunks, seen = [], 0
        with torch.inference_mode():
            for batch in tqdm(batches, total=total, desc=desc, unit="batch", disable=disable, leave=False):
                images = _batch_images(batch).to(self.device, torch.float32, non_blocking=True)
                feats = self.encoder(images).cpu()
                if not torch.isfinite(feats).all():
                    raise ValueError(f"features of inputs[{seen}:{seen + len(feats)}] are not finite (NaN/inf); "
                                     f"are the weights in {self.source or 'this model'} broken?")
                chunks.append(feats)
                seen += len(feats)
        if not chunks:
            raise ValueError("no images to embed (the input yielded no batches)")
        return torch.cat(chunks)
