"""Dataset, transforms, caption picking and DataLoader builders over a packed split."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _augment import Aug
from PIL import Image

from dmf_core.data.loading.loader import (
    CaptionPicker,
    ReidImageDataset,
    build_test_loader,
    build_test_transform,
    build_train_loader,
    build_train_transform,
    decode_to_tensor,
    set_epoch,
)
from dmf_core.data.store.lmdb_store import pack_split


def make_split(tmp: Path, ids: int = 8, per_id: int = 6, captions: bool = True, png: bool = False):
    rng = np.random.default_rng(0)
    root = tmp / "raw"
    rows, caps = [], []
    for pid in range(ids):
        for n in range(per_id):
            rel = f"{pid:04d}_c{n % 2}_{n:02d}.{'png' if png and n == 0 else 'jpg'}"
            arr = np.kron(rng.integers(0, 255, (10, 5, 3)), np.ones((4, 4, 1))).astype(np.uint8)
            root.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / rel)
            rows.append({"image_id": rel, "split": "train", "pid": pid * 3, "camid": n % 2, "dataset": "t"})
            caps += [{"image_id": rel, "caption_idx": j, "caption": f"person {pid} view {n} text {j}"}
                     for j in range(3)]
    caps = pd.DataFrame(caps)
    out = tmp / "lmdb" / "t-train.lmdb"
    pack_split(pd.DataFrame(rows), root, out, relabel=True, captions=caps if captions else None,
               params_fingerprint={"resize": None})
    return out, caps


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


_PHOTO = Image.fromarray(np.random.default_rng(3).integers(0, 255, (30, 15, 3), dtype=np.uint8)).resize((20, 40))
_ROTATE = Image.Exif()
_ROTATE[0x0112] = 6  # EXIF orientation: rotate 90 degrees to display


@pytest.mark.filterwarnings("error")  # no DeprecationWarning (torchvision.io's) nor any other
@pytest.mark.parametrize("kind, data", [
    ("jpeg", _encoded(_PHOTO, "JPEG", quality=90)),
    ("jpeg 4:4:4", _encoded(_PHOTO, "JPEG", quality=95, subsampling=0)),
    ("jpeg progressive", _encoded(_PHOTO, "JPEG", progressive=True)),
    ("jpeg grey", _encoded(_PHOTO.convert("L"), "JPEG")),
    ("jpeg cmyk", _encoded(_PHOTO.convert("CMYK"), "JPEG")),
    ("jpeg exif rotated", _encoded(_PHOTO, "JPEG", exif=_ROTATE.tobytes())),
    ("png", _encoded(_PHOTO, "PNG")),
    ("png grey", _encoded(_PHOTO.convert("L"), "PNG")),
    ("png palette", _encoded(_PHOTO.convert("P"), "PNG")),
    ("png rgba", _encoded(_PHOTO.convert("RGBA"), "PNG")),
    ("png exif rotated", _encoded(_PHOTO, "PNG", exif=_ROTATE.tobytes())),
], ids=lambda v: v if isinstance(v, str) else "")
def test_decoded_pixels_are_pils(kind, data):
    """TorchCodec's pixels are PIL's (the pack stage's check) and torchvision.io's (which gave
    PIL's on all of these: docs/data_path.md), in the stored orientation: TorchCodec would turn
    an image by its EXIF orientation, such bytes go to PIL."""
    image = decode_to_tensor(data, kind)
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    assert image.dtype == torch.uint8 and image.shape == (3, 40, 20)
    assert torch.equal(image, torch.from_numpy(np.array(pil)).permute(2, 0, 1))


def test_a_16_bit_png_decodes_to_8_bits():
    """torchvision gave uint16 here (which the uint8 transforms would misread); TorchCodec scales."""
    grey16 = np.random.default_rng(0).integers(0, 65536, (8, 4), dtype=np.uint16)
    image = decode_to_tensor(_encoded(Image.fromarray(grey16), "PNG"))
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 4)
    expected = torch.from_numpy(np.round(grey16 / 257).astype(np.uint8))
    assert torch.equal(image, expected.expand(3, 8, 4))


def test_transforms_shapes():
    img = torch.randint(0, 256, (3, 40, 20), dtype=torch.uint8)
    train = build_train_transform(64, 32, Aug())(img)
    test = build_test_transform(64, 32, Aug())(img)
    assert train.shape == test.shape == (3, 64, 32) and train.dtype == test.dtype == torch.float32
    assert -1.0 <= float(test.min()) and float(test.max()) <= 1.0
    assert torch.equal(test, build_test_transform(64, 32, Aug())(img))
    plain = build_train_transform(64, 32, Aug(flip=0, pad=0, erasing=0))(img)
    assert torch.allclose(plain, test)


@pytest.mark.parametrize("shape", [(3, 64, 32), (3, 40, 20), (3, 128, 70)])
def test_test_transform_is_torchvisions_chain_bit_for_bit(shape):
    """At the model's size (the demo's renders), smaller and larger, and on a non-contiguous image
    (an H x W x 3 array permuted, as the FeatureExtractor passes it): the same floats as v2's chain."""
    from torchvision.transforms import v2

    aug = Aug(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    chain = v2.Compose([v2.Resize((64, 32), antialias=True), v2.ToDtype(torch.float32, scale=True),
                        v2.Normalize(list(aug.mean), list(aug.std))])
    hwc = torch.randint(0, 256, (*shape[1:], 3), dtype=torch.uint8)
    for img in (hwc.permute(2, 0, 1).contiguous(), hwc.permute(2, 0, 1)):
        assert torch.equal(build_test_transform(64, 32, aug)(img), chain(img))


def test_evaluation_images_need_no_torchvision():
    """An evaluation cell's test images at the model's size never import torchvision (~1.3 s a stage)."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from dmf_core.data.loading.loader import build_test_transform\n"
            "import dmf_core.eval.run\n"
            "class A: mean, std = [0.5] * 3, [0.5] * 3\n"
            "build_test_transform(64, 32, A)(torch.zeros(3, 64, 32, dtype=torch.uint8))\n"
            "print(sorted(m for m in sys.modules if m.startswith('torchvision')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("shape", [(3, 64, 32), (3, 40, 20)])
def test_fused_augment_is_the_v2_chain_draw_for_draw(shape):
    """Under one seed the fused augment draws what torchvision's chain draws (flip, pad + crop,
    erasing) and returns the same floats: the stock chain is its reference, not a second recipe."""
    from torchvision import tv_tensors

    aug = Aug(flip=0.5, pad=4, erasing=0.5, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    fused, stock = build_train_transform(64, 32, aug), build_train_transform(64, 32, aug, fused=False)
    img = torch.randint(0, 256, shape, dtype=torch.uint8)
    outputs = set()
    for seed in range(12):
        torch.manual_seed(seed)
        mine = fused(img)
        torch.manual_seed(seed)
        theirs = stock(tv_tensors.Image(img)).as_subclass(torch.Tensor)
        assert torch.allclose(mine, theirs, atol=1e-6), seed
        outputs.add(mine.sum().item())
    assert len(outputs) > 3  # the seeds drew different augmentations, so the equality says something


def test_fused_augment_matches_v2_semantics():
    img = torch.randint(0, 256, (3, 40, 20), dtype=torch.uint8)
    ref = build_test_transform(64, 32, Aug())(img)
    none = Aug(flip=0, pad=0, erasing=0)
    assert torch.allclose(build_train_transform(64, 32, none)(img), ref, atol=1e-6)
    flipped = build_train_transform(64, 32, Aug(flip=1.0, pad=0, erasing=0))(img)
    assert torch.allclose(flipped, ref.flip(-1), atol=1e-6)
    torch.manual_seed(0)
    shifted = build_train_transform(64, 32, Aug(flip=0, pad=4, erasing=0))(img)
    # some placement of the padded image: every crop is ref shifted by (dy, dx) in [-4, 4] with fill -1
    found = False
    for dy in range(-4, 5):
        for dx in range(-4, 5):
            cand = torch.full_like(ref, -1.0)
            ys, xs = slice(max(0, dy), 64 + min(0, dy)), slice(max(0, dx), 32 + min(0, dx))
            yr, xr = slice(max(0, -dy), 64 + min(0, -dy)), slice(max(0, -dx), 32 + min(0, -dx))
            cand[:, ys, xs] = ref[:, yr, xr]
            found |= torch.allclose(cand, shifted, atol=1e-6)
    assert found
    erased = build_train_transform(64, 32, Aug(flip=0, pad=0, erasing=1.0))(img)
    diff = (erased != ref).any(0)
    rows, cols = diff.any(1).nonzero().flatten(), diff.any(0).nonzero().flatten()
    assert diff.sum() > 0 and (erased[:, diff] == 0).all()
    box = diff[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.float().mean() > 0.9  # one rectangle
    # flip/pad/erasing frequencies follow p (same RNG use as v2: torch's default generator)
    torch.manual_seed(1)
    aug = build_train_transform(64, 32, Aug(flip=0.5, pad=0, erasing=0))
    flips = sum(torch.allclose(aug(img), ref.flip(-1), atol=1e-6) for _ in range(200))
    assert 70 < flips < 130


def test_dataset_items_and_pickle(tmp_path):
    out, caps = make_split(tmp_path, png=True)
    picker = CaptionPicker(caps, seed=0)
    ds = ReidImageDataset(out, build_test_transform(48, 24, Aug()), captions=picker,
                          expected_meta={"resize": None})
    assert len(ds) == 48 and ds.num_classes == 8
    item = ds[5]
    assert item["image"].shape == (3, 48, 24) and type(item["image"]) is torch.Tensor
    assert item["label"] == ds.labels[5] and item["pid"] == ds.pids[5] and item["index"] == 5
    assert item["caption"].startswith(f"person {item['pid'] // 3} ")
    ds2 = pickle.loads(pickle.dumps(ds))
    assert torch.equal(ds2[5]["image"], item["image"]) and ds2[5]["caption"] == item["caption"]
    assert ds.load_image(0).dtype == torch.uint8  # png decodes too


def test_dataset_refuses_other_params_and_captions(tmp_path):
    out, caps = make_split(tmp_path)
    with pytest.raises(ValueError, match="t-train.lmdb: built with resize"):
        ReidImageDataset(out, None, expected_meta={"resize": [64, 32]})
    other = caps.copy()
    other.loc[0, "caption"] = "changed"
    with pytest.raises(ValueError, match="other captions"):
        ReidImageDataset(out, None, captions=CaptionPicker(other, seed=0))
    out2, _ = make_split(tmp_path / "nocap", captions=False)
    with pytest.raises(ValueError, match="images have no caption"):
        ReidImageDataset(out2, None, captions=CaptionPicker(caps.iloc[3:], seed=0))


def test_captions_resolved_by_image_id_when_packed_without_refs(tmp_path):
    """The pipeline packs pixels once; captions join by image_id at load time."""
    out, caps = make_split(tmp_path, captions=True)
    out2, _ = make_split(tmp_path / "nocap", captions=False)
    with_refs = ReidImageDataset(out, None, captions=CaptionPicker(caps, seed=0))
    by_id = ReidImageDataset(out2, None, captions=CaptionPicker(caps, seed=0))
    assert [with_refs.captions.pick(i, with_refs._cap_start[i], with_refs._cap_count[i]) for i in range(10)] == \
        [by_id.captions.pick(i, by_id._cap_start[i], by_id._cap_count[i]) for i in range(10)]


def test_caption_picker_reproducible(tmp_path):
    caps = pd.DataFrame({"image_id": ["a"] * 5 + ["b"] * 2, "caption_idx": list(range(5)) + [0, 1],
                         "caption": [f"a{j} é" for j in range(5)] + ["b0", "b1"]})
    p, q = CaptionPicker(caps, seed=3), CaptionPicker(caps.iloc[::-1], seed=3)
    picks = [p.pick(i, 0, 5, epoch=e) for e in range(4) for i in range(20)]
    assert picks == [q.pick(i, 0, 5, epoch=e) for e in range(4) for i in range(20)]
    assert set(picks) == {f"a{j} é" for j in range(5)}  # all captions get used
    assert [p.pick(i, 0, 5, epoch=0) for i in range(20)] != [p.pick(i, 0, 5, epoch=1) for i in range(20)]
    r = CaptionPicker(caps, seed=4)
    assert [p.pick(i, 0, 5, epoch=0) for i in range(20)] != [r.pick(i, 0, 5, epoch=0) for i in range(20)]
    assert p.pick(0, 5, 2) in {"b0", "b1"} and p.pick(0, 5, 0) == ""
    p.set_epoch(2)
    assert p.pick(7, 0, 5) == p.pick(7, 0, 5, epoch=2)
    assert pickle.loads(pickle.dumps(p)).pick(7, 0, 5) == p.pick(7, 0, 5)


def test_train_loader_two_workers(tmp_path):
    out, caps = make_split(tmp_path)
    P, K = 4, 3
    loader = build_train_loader(out, Aug(), 48, 24, P, K, seed=0, num_workers=2, captions=caps,
                                expected_meta={"resize": None})
    seen = {}
    for epoch in (0, 1):
        set_epoch(loader, epoch)
        batches = list(loader)
        assert len(batches) == len(loader) > 0
        for b in batches:
            assert b["image"].shape == (P * K, 3, 48, 24)
            assert len(set(b["label"].tolist())) == P and len(b["caption"]) == P * K
            for lbl, pid in zip(b["label"].tolist(), b["pid"].tolist()):
                assert pid == lbl * 3
        seen[epoch] = [(b["index"].tolist(), b["caption"]) for b in batches]
        images1 = [{"image": b["image"]} for b in batches]
    assert seen[0] != seen[1]
    # reproducible: a fresh loader (num_workers=0) at epoch 1 gives the same indices and captions
    again = build_train_loader(out, Aug(), 48, 24, P, K, seed=0, num_workers=0, captions=caps, epoch=1)
    batches0 = list(again)
    assert [(b["index"].tolist(), b["caption"]) for b in batches0] == seen[1]
    # ... and the same augmented images (seeded per (seed, epoch, index), not per worker)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(batches0, images1))
    state = torch.get_rng_state()
    list(again)
    assert torch.equal(state, torch.get_rng_state())  # main-process RNG untouched
    assert not list(out.parent.glob("*-lock"))


def test_test_loader_order(tmp_path):
    out, _ = make_split(tmp_path)
    loader = build_test_loader(out, Aug(), 48, 24, batch_size=10, num_workers=2)
    first = loader.dataset[0]["image"]  # the main process opens the env before workers fork
    idx = torch.cat([b["index"] for b in loader]).tolist()
    assert idx == list(range(48))
    assert torch.equal(next(iter(loader))["image"][0], first)
    assert loader.dataset.sidecar["image_id"].is_monotonic_increasing
