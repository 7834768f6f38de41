"""train.decode: device -- the batch decoded and augmented on the device equals the worker path."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from _augment import Aug as _Aug
from PIL import Image

from dmf_core.data.loading.device_augment import BatchAugment
from dmf_core.data.loading.loader import build_train_loader, set_epoch
from dmf_core.data.store.lmdb_store import pack_split


def Aug(**settings) -> _Aug:  # noqa: N802 - stands for the settings class
    """ImageNet normalisation, so that the float conversion is not a plain scale."""
    return _Aug(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], **settings)


def save_image(path, arr, kind: str) -> None:
    """kind: rgb | gray | cmyk | progressive | exif (JPEGs; exif: orientation "rotate 90") or png."""
    image = Image.fromarray(arr)
    if kind == "exif":
        exif = Image.Exif()
        exif[0x0112] = 6
        image.save(path, "JPEG", exif=exif.tobytes())
    elif kind == "gray":
        image.convert("L").save(path, "JPEG")
    elif kind == "cmyk":
        image.convert("CMYK").save(path, "JPEG")
    elif kind == "progressive":
        image.save(path, "JPEG", progressive=True, quality=90)
    else:
        image.save(path, "PNG" if kind == "png" else "JPEG")


def make_split(tmp, sizes=((40, 20),), kinds=("rgb",)):
    rng = np.random.default_rng(1)
    root, rows = tmp / "raw", []
    root.mkdir(parents=True)
    for pid in range(6):
        for n in range(4):
            h, w = sizes[(pid + n) % len(sizes)]
            kind = kinds[(pid * 4 + n) % len(kinds)]
            rel = f"{pid:04d}_c{n % 2}_{n:02d}.{'png' if kind == 'png' else 'jpg'}"
            save_image(root / rel, rng.integers(0, 255, (h, w, 3), dtype=np.uint8), kind)
            rows.append({"image_id": rel, "split": "train", "pid": pid, "camid": n % 2, "dataset": "t"})
    out = tmp / "t-train.lmdb"
    pack_split(pd.DataFrame(rows), root, out, relabel=True, params_fingerprint={"resize": None})
    return out


def loaders(lmdb, aug, workers=0):
    common = dict(P=3, K=4, seed=7, num_workers=workers)
    return (build_train_loader(lmdb, aug, 48, 24, **common),
            build_train_loader(lmdb, aug, 48, 24, encoded=True, **common))


@pytest.mark.parametrize("aug", [Aug(), Aug(flip=1.0, erasing=1.0), Aug(flip=0.0, pad=0, erasing=0.0)],
                         ids=["default", "always", "never"])
def test_device_batch_equals_worker_batch(tmp_path, aug):
    lmdb = make_split(tmp_path, sizes=((40, 20), (48, 24), (60, 30)),
                      kinds=("rgb", "gray", "rgb", "cmyk", "png", "progressive", "rgb", "exif"))
    plain, encoded = loaders(lmdb, aug)
    batch_augment = BatchAugment(48, 24, aug, "cpu")
    compared = 0
    for epoch in (0, 1):
        set_epoch(plain, epoch)
        set_epoch(encoded, epoch)
        for a, b in zip(plain, encoded, strict=True):
            compared += 1
            assert "image" not in b and len(b["encoded_lengths"]) == 12 and b["augment"].shape == (12, 7)
            assert b["encoded"].dtype == torch.uint8 and len(b["encoded"]) == int(b["encoded_lengths"].sum())
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])
            images = batch_augment(b)
            assert images.shape == (12, 3, 48, 24) and images.dtype == torch.float32
            assert torch.equal(images, a["image"])
    assert compared == 2 * len(plain) > 0  # every batch of both epochs, and there were some


def test_encoded_batches_with_workers_match(tmp_path):
    lmdb = make_split(tmp_path)
    _, in_process = loaders(lmdb, Aug())
    _, with_workers = loaders(lmdb, Aug(), workers=2)
    pairs = list(zip(in_process, with_workers, strict=True))
    assert pairs, "no batches to compare"
    for a, b in pairs:
        for key in ("augment", "encoded", "encoded_lengths"):
            assert torch.equal(a[key], b[key])


def test_encoded_item_refuses_a_bomb_before_decoding(tmp_path):
    lmdb = make_split(tmp_path)
    _, encoded = loaders(lmdb, Aug())
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 100  # every 40x20 image is now over twice the limit
    try:
        with pytest.raises(Image.DecompressionBombError, match="t-train.lmdb"):
            next(iter(encoded))
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def test_an_image_no_decoder_reads_is_named(tmp_path):
    lmdb = make_split(tmp_path)
    _, encoded = loaders(lmdb, Aug())
    batch = next(iter(encoded))
    lengths = batch["encoded_lengths"].tolist()
    flat = batch["encoded"].clone()
    start = sum(lengths[:3])
    flat[start + 200:start + lengths[3]] = 0  # image 3: a JPEG header over garbage
    batch["encoded"] = flat
    names = {int(i): f"t-train.lmdb: image {int(i)}" for i in batch["index"]}
    with pytest.raises(ValueError, match=f"image {int(batch['index'][3])}: does not decode"):
        BatchAugment(48, 24, Aug(), "cpu", name_of=names.__getitem__)(batch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh)")
def test_cuda_batch_is_close_to_the_cpu_batch(tmp_path):
    """nvJPEG and the GPU's antialiased resize are not libjpeg and the CPU's: they differ by
    rounding, most on these per-pixel noise images (2.7 grey levels on average over a batch on an
    H200, torchvision 0.26, 2026-12-04). A wrong flip, crop, channel order or normalisation of an
    image moves its pixels by ~50 levels on average: each image must stay within 8."""
    lmdb = make_split(tmp_path, sizes=((40, 20), (60, 30)), kinds=("rgb", "gray", "cmyk", "progressive"))
    _, encoded = loaders(lmdb, Aug())
    std = torch.tensor(Aug().std).view(1, 3, 1, 1)
    batches = list(encoded)
    assert batches, "no batches to compare"
    for batch in batches:
        on_cpu = BatchAugment(48, 24, Aug(), "cpu")(batch)
        on_gpu = BatchAugment(48, 24, Aug(), "cuda")(batch).cpu()
        levels = ((on_gpu - on_cpu) * std * 255).abs().mean((1, 2, 3))  # per image, in 8-bit grey levels
        assert float(levels.max()) < 8.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh)")
def test_cuda_batch_never_waits_for_the_training_stream(tmp_path):
    """The next batch is decoded while the GPU runs the last step: no torch call in the batch
    path may synchronise the host with the device (torchvision's wait for its own decode stream
    is a raw CUDA call, outside this check)."""
    lmdb = make_split(tmp_path, sizes=((40, 20), (60, 30)), kinds=("rgb", "progressive"))
    _, encoded = loaders(lmdb, Aug())
    batch_augment = BatchAugment(48, 24, Aug(), "cuda")
    batches = [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()} for b in encoded]
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = [batch_augment(b) for b in batches]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(o.is_cuda and o.shape[1:] == (3, 48, 24) for o in out)
