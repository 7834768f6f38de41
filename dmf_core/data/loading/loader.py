"""The training/test data path over packed LMDB splits: Dataset, transforms, caption picking,
DataLoader builders.

- Images are decoded with TorchCodec (``torchcodec.decoders``, libjpeg-turbo/libpng, no FFmpeg) on
  the stored bytes: the pixels of ``torchvision.io.decode_image``, which torchvision 0.29
  deprecates, at its speed (about 2.5x faster than PIL plus a PIL->tensor conversion here; PIL is
  the fallback for formats TorchCodec lacks and for bytes that may hold EXIF, see
  :func:`decode_to_tensor`), once PIL has read the header and checked the declared size against
  its decompression-bomb limit (:mod:`dmf_core.data.images`; the decoder has no limit of its own),
  then augmented as uint8 tensors (:class:`ReidTrainAugment`: the v2 chain's semantics fused into
  one pass, about 1.6x faster here; ``build_train_transform(..., fused=False)`` gives the stock
  ``torchvision.transforms.v2`` chain) and converted to float last.
- Augmentations are seeded per (seed, epoch, index): identical with any number of workers.
- The LMDB is opened lazily in each process (see :class:`~dmf_core.data.store.lmdb_store.LmdbReader`),
  so ``num_workers > 0`` works and no lock file is touched.
- Per epoch, call :func:`set_epoch` (``loader.batch_sampler`` and the caption picker follow it);
  the caption epoch lives in shared memory, so persistent workers see it too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torchcodec.decoders import decode_image as _codec_decode_image
from torchcodec.decoders import decode_jpeg as _codec_decode_jpeg
from torchcodec.decoders import decode_png as _codec_decode_png

from dmf_core.data.images import open_checked
from dmf_core.data.loading.sampler import PKSampler
from dmf_core.data.store.lmdb_store import LmdbReader, caption_refs, captions_digest

# torchvision is imported where a transform needs it, not here: its import (~1.3 s, its models
# included) would be paid by every stage, and the test transform and the fused training augment
# need it only for an image that is not already at the model's size.

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------
# Decoding and transforms
# ---------------------------------------------------------------------------------------------


JPEG_MAGIC, PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
# TorchCodec turns an image by its EXIF orientation and has no switch to keep the stored one;
# torchvision's decoder kept it, and so do PIL (the fallback) and the pack stage, which records
# the stored height and width. Bytes with any of these markers (JPEG APP1, PNG eXIf, WebP EXIF)
# go to PIL instead: the stored orientation, the pixels of before. ReID crops carry no EXIF.
_EXIF_MARKERS = (b"Exif\x00\x00", b"eXIf", b"EXIF")


def may_hold_exif(data: bytes, header: Image.Image | None = None) -> bool:
    """True when ``data`` may hold EXIF. A JPEG's ``header`` (PIL, opened on ``data``) knows: PIL
    read every segment before the image data, and keeps an APP1 "Exif" as ``info["exif"]``, where
    libjpeg finds it too. Otherwise: any EXIF marker in the bytes (by chance too: PIL decodes
    such an image, the same pixels)."""
    if header is not None and data[:3] == JPEG_MAGIC:
        return "exif" in header.info
    return any(marker in data for marker in _EXIF_MARKERS)


def _codec_decode(data: bytes) -> torch.Tensor:
    """TorchCodec's decoder for the format of ``data`` (JPEG and PNG named by their magic bytes, the
    rest detected by TorchCodec), RGB. Raises RuntimeError on corrupt data, ValueError on a format
    it lacks. The tensor is made here (a copy): TorchCodec would wrap read-only bytes itself under
    ``warnings.catch_warnings``, which is not thread-safe."""
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if data[:3] == JPEG_MAGIC:
        return _codec_decode_jpeg(buf, mode="RGB")
    if data[:8] == PNG_MAGIC:
        return _codec_decode_png(buf, mode="RGB")
    return _codec_decode_image(buf, mode="RGB")


def decode_to_tensor(data: bytes, name: str = "image") -> torch.Tensor:
    """Stored bytes -> uint8 RGB tensor 3xHxW.

    The decoder has no pixel limit (it allocates whatever the header declares), so PIL reads the
    header first and an image over PIL's limit raises DecompressionBombError naming ``name``
    before any decoder runs (:func:`~dmf_core.data.images.open_checked`). Then TorchCodec decodes
    it: the same tensors as torchvision's ``decode_image`` gave (checked on every image of the
    packed demo splits, and on grey, CMYK, progressive JPEGs and PNGs: docs/data_path.md), except
    that a 16-bit PNG now gives uint8 (torchvision gave uint16) and an animated GIF/WebP its first
    frame (through PIL). PIL decodes what TorchCodec refuses or lacks, and bytes that may hold
    EXIF (:func:`may_hold_exif`); data PIL cannot decode either raises ValueError naming ``name``.
    """
    header = open_checked(data, name)
    if not may_hold_exif(data, header):
        try:
            image = _codec_decode(data)
        except (RuntimeError, ValueError):  # corrupt (PIL names the error below), or a format it lacks
            image = None
        if image is not None and image.dim() == 3:  # an animated image (N frames): PIL's first frame
            return image
    try:
        header.load()
    except (OSError, SyntaxError, ValueError) as exc:  # what PIL raises on truncated or garbled data
        raise ValueError(f"{name}: does not decode ({exc.__class__.__name__}: {exc})") from exc
    im = header if header.mode == "RGB" else header.convert("RGB")
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class ReidTrainAugment(torch.nn.Module):
    """Resize, flip, pad + random crop, normalise and random erasing in one pass over a uint8
    3xHxW tensor, with the semantics of the torchvision v2 chain ``Resize -> RandomHorizontalFlip
    -> Pad(pad, fill 0) -> RandomCrop -> ToDtype(float, scale) -> Normalize -> RandomErasing(value 0)``
    (:func:`build_train_transform` with ``fused=False``), at about a third of its cost: flip, pad
    and crop become one slice copy, the float conversion and normalisation one multiply-subtract,
    and the erasing box is drawn with the same algorithm (scale 0.02-0.33, ratio 0.3-3.3, 10 tries).
    Randomness comes from torch's default generator, so per-sample seeding works as for v2.
    """

    def __init__(self, height: int, width: int, flip: float, pad: int, erasing: float, mean, std,
                 erasing_scale=(0.02, 0.33), erasing_ratio=(0.3, 3.3)):
        super().__init__()
        self.size = (int(height), int(width))
        self.flip, self.pad, self.erasing = float(flip), int(pad), float(erasing)
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(3, 1, 1)
        self.shift = torch.tensor([m / s for m, s in zip(mean, std)], dtype=torch.float32).view(3, 1, 1)
        self.erasing_scale = tuple(float(v) for v in erasing_scale)
        self.log_ratio = (float(np.log(erasing_ratio[0])), float(np.log(erasing_ratio[1])))

    def draw(self, generator: torch.Generator | None = None) -> AugmentDraw:
        """This sample's random choices, in the order the chain makes them."""
        return draw_augment(self.size, self.flip, self.pad, self.erasing, self.erasing_scale, self.log_ratio,
                            generator)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        img = img.as_subclass(torch.Tensor)
        H, W = self.size
        if tuple(img.shape[-2:]) != self.size:
            img = _resize(img, self.size)
        d = self.draw()
        if d.flip:
            img = img.flip(-1)
        p = self.pad
        if p > 0:
            oy, ox = p - d.dy, p - d.dx  # where the image's (0, 0) lands in the crop
            y0, y1, x0, x1 = max(0, oy), min(H, oy + H), max(0, ox), min(W, ox + W)
            out = (-self.shift).expand(3, H, W).clone()  # the normalised value of fill 0
            out[:, y0:y1, x0:x1] = img[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox].float() * self.scale - self.shift
        else:
            out = img.float() * self.scale - self.shift
        if d.box is not None:
            i, j, h, w = d.box
            out[:, i:i + h, j:j + w] = 0.0
        return out


@dataclass(frozen=True)
class AugmentDraw:
    """One sample's random choices: flipped, the crop's offset in the padded image, the erased box."""
    flip: bool
    dy: int
    dx: int
    box: tuple[int, int, int, int] | None  # top, left, height, width

    def as_tensor(self) -> torch.Tensor:
        """int64 [flip, dy, dx, top, left, height, width]; no box: height = width = 0."""
        return torch.tensor([int(self.flip), self.dy, self.dx, *(self.box or (0, 0, 0, 0))], dtype=torch.int64)


def draw_augment(size: tuple[int, int], flip: float, pad: int, erasing: float, erasing_scale: tuple[float, float],
                 log_ratio: tuple[float, float], generator: torch.Generator | None = None) -> AugmentDraw:
    """The random choices of :class:`ReidTrainAugment`, drawn from ``generator`` (torch's default
    one if None) in the chain's order; the batched device path (:mod:`dmf_core.data.loading.device_augment`)
    draws with the same function, so both give the same images from the same seed."""
    H, W = size
    do_flip = flip > 0 and float(torch.rand((), generator=generator)) < flip
    dy = dx = pad
    if pad > 0:
        dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=generator))
    box = None
    if erasing > 0 and float(torch.rand((), generator=generator)) < erasing:
        lo, hi = erasing_scale
        for _ in range(10):
            u = torch.rand(2, generator=generator).tolist()
            erase_area = H * W * (lo + (hi - lo) * u[0])
            aspect = float(np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1]))
            h = int(round(np.sqrt(erase_area * aspect)))
            w = int(round(np.sqrt(erase_area / aspect)))
            if not (h < H and w < W):
                continue
            i = int(torch.randint(0, H - h + 1, (), generator=generator))
            j = int(torch.randint(0, W - w + 1, (), generator=generator))
            box = (i, j, h, w)
            break
    return AugmentDraw(do_flip, dy, dx, box)


def _resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision v2's antialiased bilinear resize (what ``v2.Resize(size, antialias=True)`` runs)."""
    from torchvision.transforms import v2

    return v2.functional.resize(img, list(size), antialias=True)


class ReidTestTransform(torch.nn.Module):
    """The test chain ``Resize -> ToDtype(float, scale) -> Normalize`` of torchvision v2, with the
    same arithmetic in the same order (its results bit for bit, tests/test_loader.py); torchvision
    runs only for an image that is not already HxW, since its Resize returns such an image as it is."""

    def __init__(self, height: int, width: int, mean, std):
        super().__init__()
        self.size = (int(height), int(width))
        self.mean = torch.tensor([float(m) for m in mean], dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor([float(s) for s in std], dtype=torch.float32).view(-1, 1, 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        img = img.as_subclass(torch.Tensor)
        if tuple(img.shape[-2:]) != self.size:
            img = _resize(img, self.size)
        return img.to(torch.float32).mul_(1.0 / 255).sub_(self.mean).div_(self.std)


def build_train_transform(height: int, width: int, augment, *, fused: bool = True) -> torch.nn.Module:
    """Paper profile: resize, flip p, pad + random crop, to float, normalise, random erasing p.

    ``augment`` is an AugmentConfig (flip, pad, erasing, mean, std). Input: uint8 3xHxW tensor.
    ``fused`` (default) runs :class:`ReidTrainAugment`; ``fused=False`` the stock v2 chain.
    """
    if fused:
        return ReidTrainAugment(height, width, augment.flip, augment.pad, augment.erasing, augment.mean, augment.std)
    from torchvision.transforms import v2

    steps: list = [v2.Resize((height, width), antialias=True)]
    if augment.flip > 0:
        steps.append(v2.RandomHorizontalFlip(p=augment.flip))
    if augment.pad > 0:
        steps += [v2.Pad(augment.pad), v2.RandomCrop((height, width))]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(augment.mean), list(augment.std))]
    if augment.erasing > 0:
        # value 0 after normalising = the mean colour (torchreid's RandomErasing fills with the mean)
        steps.append(v2.RandomErasing(p=augment.erasing, value=0))
    return v2.Compose(steps)


def build_test_transform(height: int, width: int, augment) -> ReidTestTransform:
    """Resize to HxW, to float in [0, 1], normalise with ``augment.mean`` / ``augment.std``."""
    return ReidTestTransform(height, width, augment.mean, augment.std)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a fast, well-mixed, platform-independent integer hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class CaptionPicker:
    """Picks one caption per (image, epoch), reproducibly: the choice is a hash of
    ``(seed, epoch, index)``, independent of worker count, batch order and rank.

    ``captions``: the captions parquet (path) or frame (image_id, caption_idx, caption); rows are
    sorted by (image_id, caption_idx), the order the LMDB sidecar's ``caption_start`` refers to.
    Texts are held as one UTF-8 blob + offsets (cheap to pickle to workers, no per-string refcounts).
    """

    def __init__(self, captions: pd.DataFrame | Path | str, seed: int, epoch: int = 0):
        self.source = str(captions) if not isinstance(captions, pd.DataFrame) else "<frame>"
        frame = pd.read_parquet(captions) if not isinstance(captions, pd.DataFrame) else captions
        frame = frame.sort_values(["image_id", "caption_idx"], kind="mergesort").reset_index(drop=True)
        self.digest = captions_digest(frame)
        self.image_ids = frame["image_id"].to_numpy()
        encoded = [str(s).encode("utf-8") for s in frame["caption"].tolist()]
        self._blob = b"".join(encoded)
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self.seed = int(seed)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._epoch[0] = int(epoch)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = int(epoch)

    def choose(self, index: int, count: int, epoch: int | None = None) -> int:
        """Which of an image's ``count`` captions (0-based) to use for ``index`` this epoch."""
        count = int(count)
        if count <= 0:
            return -1
        e = self.epoch if epoch is None else int(epoch)
        h = _mix64(_mix64(_mix64(self.seed & _MASK64) ^ (e & _MASK64)) ^ (int(index) & _MASK64))
        return h % count

    def text(self, row: int) -> str:
        return self._blob[self._offsets[row]:self._offsets[row + 1]].decode("utf-8")

    def pick(self, index: int, start: int, count: int, epoch: int | None = None) -> str:
        """The caption of image ``index`` whose captions are rows ``start .. start+count-1``;
        ``""`` for an image without captions."""
        j = self.choose(index, count, epoch)
        return "" if j < 0 else self.text(int(start) + j)


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------


class SeededImages(torch.utils.data.Dataset):
    """Images with labels whose random transform is seeded per (seed, epoch, index): the item
    assembly every training dataset shares. Subclasses set ``labels``, ``pids``, ``camids`` (numpy
    int64) and implement :meth:`stored_bytes` and :meth:`image_name`.

    Item: ``{"image": float 3xHxW, "label", "pid", "camid", "index"}``. With ``encoded=True``
    (``transform`` a :class:`ReidTrainAugment`) an item has ``"encoded"`` (the stored bytes, uint8)
    and ``"augment"`` (its random choices, :meth:`AugmentDraw.as_tensor`) instead of ``"image"``:
    :class:`~dmf_core.data.loading.device_augment.BatchAugment` decodes and augments the batch on
    the training device.

    With ``augment_seed``, the random transform of item ``i`` is seeded from
    ``(augment_seed, epoch, i)``: the same epoch gives the same augmented image whatever the number
    of workers, the rank or a resume (in the main process the global RNG state is left untouched).
    """

    labels: np.ndarray
    pids: np.ndarray
    camids: np.ndarray

    def __init__(self, transform, *, augment_seed: int | None = None, encoded: bool = False):
        if encoded and (augment_seed is None or not isinstance(transform, ReidTrainAugment)):
            raise ValueError("encoded items carry their augmentation draws: give augment_seed and a "
                             "ReidTrainAugment")
        self.augment_seed = augment_seed
        self.encoded = encoded
        self.transform = transform
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def stored_bytes(self, i: int) -> bytes:
        raise NotImplementedError

    def image_name(self, i: int) -> str:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) and self.labels.max() >= 0 else 0

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Epoch for augmentation seeds (shared with persistent workers)."""
        self._epoch[0] = int(epoch)

    def sample_seed(self, i: int) -> int:
        """The seed of item ``i``'s augmentation this epoch (63 bits)."""
        return _mix64(_mix64(_mix64(self.augment_seed & _MASK64) ^ (self.epoch & _MASK64)) ^ i) >> 1

    def augment_draw(self, i: int) -> AugmentDraw:
        """Item ``i``'s random choices this epoch: the ones :meth:`_augment` makes."""
        return self.transform.draw(torch.Generator().manual_seed(self.sample_seed(i)))

    def _augment(self, image, i: int):
        if self.augment_seed is None:
            return self.transform(image)
        seed = self.sample_seed(i)
        if torch.utils.data.get_worker_info() is not None:  # a worker's RNG is ours to set
            torch.default_generator.manual_seed(seed)
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.transform(image)

    def load_image(self, i: int) -> torch.Tensor:
        """Decoded, untransformed uint8 3xHxW (an image over PIL's pixel limit raises
        DecompressionBombError naming the LMDB and the image_id)."""
        return decode_to_tensor(self.stored_bytes(i), self.image_name(i))

    def encoded_image(self, i: int) -> torch.Tensor:
        """The stored bytes of image ``i`` as a uint8 tensor, for decoding on the training device;
        the header is checked against PIL's pixel limit first, as for :meth:`load_image`."""
        data = self.stored_bytes(i)
        open_checked(data, self.image_name(i))
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def __getitem__(self, i) -> dict:
        i = int(i)
        if self.encoded:  # decoded and augmented on the device, batched (device_augment.py)
            item = {"encoded": self.encoded_image(i), "augment": self.augment_draw(i).as_tensor()}
        else:
            image = self.load_image(i)
            if self.transform is not None:
                if not isinstance(self.transform, (ReidTestTransform, ReidTrainAugment)):
                    from torchvision import tv_tensors  # v2 transforms dispatch on the image type

                    image = tv_tensors.Image(image)
                image = self._augment(image, i)
            item = {"image": image.as_subclass(torch.Tensor)}
        item.update({"label": int(self.labels[i]), "pid": int(self.pids[i]), "camid": int(self.camids[i]),
                     "index": i})
        return item


class ReidImageDataset(SeededImages):
    """One packed split (:class:`SeededImages`' items, + ``"caption": str`` when a
    :class:`CaptionPicker` is given)."""

    def __init__(self, lmdb_path: Path, transform, *, captions: CaptionPicker | None = None,
                 expected_meta: dict | None = None, augment_seed: int | None = None, encoded: bool = False):
        super().__init__(transform, augment_seed=augment_seed, encoded=encoded)
        self.reader = LmdbReader(Path(lmdb_path), expected_meta)
        self.path = self.reader.path
        self.sidecar = self.reader.sidecar
        self.labels = self.sidecar["label"].to_numpy(dtype=np.int64)
        self.pids = self.sidecar["pid"].to_numpy(dtype=np.int64)
        self.camids = self.sidecar["camid"].to_numpy(dtype=np.int64)
        self._image_ids = self.sidecar["image_id"].to_numpy()  # names images in decode errors
        self.captions = captions
        if captions is not None:
            self._cap_start, self._cap_count = self._caption_refs(captions)

    def _caption_refs(self, captions: CaptionPicker) -> tuple[np.ndarray, np.ndarray]:
        if "caption_start" in self.sidecar.columns:
            want = self.reader.meta.get("captions_sha1")
            if want is not None and want != captions.digest:
                raise ValueError(f"{self.path}: packed against other captions than {captions.source} "
                                 f"(digest {want[:12]} vs {captions.digest[:12]}); rerun the pack stage")
            start = self.sidecar["caption_start"].to_numpy(dtype=np.int64)
            count = self.sidecar["caption_count"].to_numpy(dtype=np.int64)
        else:
            # packed without caption references (the pipeline's default, so that re-captioning
            # never re-packs images): resolve them here by image_id
            start, count = caption_refs(self.sidecar["image_id"], captions.image_ids)
            without = int((count == 0).sum())
            if without:
                raise ValueError(f"{self.path}: {without} of {len(self)} images have no caption in "
                                 f"{captions.source} (first: {self.sidecar['image_id'][np.argmax(count == 0)]})")
        if len(self) and int((start + count).max()) > len(captions):
            raise ValueError(f"{self.path}: caption references beyond the {len(captions)} rows of "
                             f"{captions.source}; rerun the pack stage")
        return start, count

    def caption_rows(self, i: int) -> range:
        """The caption rows (of the picker) image ``i`` chooses from."""
        start = int(self._cap_start[i])
        return range(start, start + int(self._cap_count[i]))

    def take_captions_of(self, source: np.ndarray) -> None:
        """From now on image ``i`` reads the captions of image ``source[i]`` (the
        shuffled-captions control)."""
        source = np.asarray(source, dtype=np.int64)
        if self.captions is None or source.shape != (len(self),):
            raise ValueError(f"take_captions_of: expected {len(self)} source indices on a dataset with captions")
        self._cap_start, self._cap_count = self._cap_start[source], self._cap_count[source]

    def __len__(self) -> int:
        return len(self.reader)

    def set_epoch(self, epoch: int) -> None:
        """Epoch for augmentation seeds and caption choice (shared with persistent workers)."""
        super().set_epoch(epoch)
        if self.captions is not None:
            self.captions.set_epoch(epoch)

    def stored_bytes(self, i: int) -> bytes:
        return self.reader.get_bytes(i)

    def image_name(self, i: int) -> str:
        return f"{self.path}: {self._image_ids[int(i)]}"

    def __getitem__(self, i) -> dict:
        item = super().__getitem__(i)
        if self.captions is not None:
            i = int(i)
            item["caption"] = self.captions.pick(i, self._cap_start[i], self._cap_count[i])
        return item


# ---------------------------------------------------------------------------------------------
# DataLoaders
# ---------------------------------------------------------------------------------------------


def build_train_loader(
    lmdb_path: Path,
    cfg_augment,
    height: int,
    width: int,
    P: int,
    K: int,
    seed: int,
    *,
    epoch: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    captions: CaptionPicker | Path | str | None = None,
    expected_meta: dict | None = None,
    pin_memory: bool = False,
    holdout_ids: int = 0,
    encoded: bool = False,
) -> torch.utils.data.DataLoader:
    """P x K training loader of one rank. ``loader.batch_sampler`` is the :class:`PKSampler`
    (``len(loader)`` batches per epoch, the same on every rank); call :func:`set_epoch` before
    each epoch (training resumes at epoch boundaries, so no position within an epoch is kept).
    Augmentations are seeded per (seed, epoch, index), so a batch is the same with any
    ``num_workers`` and after a resume.
    ``captions`` (picker or captions parquet path) adds a ``"caption"`` list to each batch.
    ``holdout_ids``: the last that many identities (by label) are never drawn.
    ``encoded``: batches carry the stored bytes (``"encoded"``, flat, and ``"encoded_lengths"``)
    and each image's random choices (``"augment"``, B x 7) instead of ``"image"``, for
    :class:`~dmf_core.data.loading.device_augment.BatchAugment`."""
    if captions is not None and not isinstance(captions, CaptionPicker):
        captions = CaptionPicker(captions, seed=seed, epoch=epoch)
    dataset = ReidImageDataset(lmdb_path, build_train_transform(height, width, cfg_augment), captions=captions,
                               expected_meta=expected_meta, augment_seed=seed, encoded=encoded)
    kept = dataset.num_classes - int(holdout_ids)
    if holdout_ids and kept < P:
        raise ValueError(f"{lmdb_path}: holding out {holdout_ids} of {dataset.num_classes} identities leaves "
                         f"{kept}, fewer than P={P}")
    sampler = PKSampler(dataset.labels, P, K, seed=seed, rank=rank, world_size=world_size,
                        exclude_from=kept if holdout_ids else None)
    return pk_loader(dataset, sampler, seed, epoch=epoch, num_workers=num_workers, rank=rank,
                     pin_memory=pin_memory)


def pk_loader(dataset: SeededImages, sampler: PKSampler, seed: int, *, epoch: int = 0, num_workers: int = 0,
              rank: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """The DataLoader of a training dataset and its P x K sampler, both moved to ``epoch``."""
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    # own generator: creating an iterator draws a worker base seed, keep the global RNG out of it
    generator = torch.Generator().manual_seed(int(seed) * 1000 + int(rank))
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=num_workers > 0, generator=generator,
        prefetch_factor=4 if num_workers > 0 else None,
        collate_fn=collate_encoded if dataset.encoded else None,
    )


def collate_encoded(items: list[dict]) -> dict:
    """Default collation, except the encoded images (their lengths differ): one flat uint8
    tensor ``encoded`` and ``encoded_lengths``; ``encoded.split(lengths.tolist())`` gives them back."""
    encoded = [item.pop("encoded") for item in items]
    batch = torch.utils.data.default_collate(items)
    batch["encoded"] = torch.cat(encoded)
    batch["encoded_lengths"] = torch.tensor([len(e) for e in encoded], dtype=torch.int64)
    return batch


def set_epoch(loader: torch.utils.data.DataLoader, epoch: int) -> None:
    """Move a training loader to ``epoch``: sampler order and caption choice. Call before iter()."""
    if hasattr(loader.batch_sampler, "set_epoch"):
        loader.batch_sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


def build_test_loader(lmdb_path: Path, cfg_augment, height: int, width: int, batch_size: int,
                      num_workers: int = 0, *, expected_meta: dict | None = None,
                      pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Deterministic loader over a query/gallery split, in key (sidecar) order."""
    dataset = ReidImageDataset(lmdb_path, build_test_transform(height, width, cfg_augment),
                               expected_meta=expected_meta)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False,
                                       num_workers=num_workers, pin_memory=pin_memory)
