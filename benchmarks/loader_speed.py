"""Decoded-and-augmented samples/s through a DataLoader: LMDB vs a folder of JPEGs.

    .venv/bin/python benchmarks/loader_speed.py [--images 3000] [--workers 2] [--rounds 3] [--torchvision]

(a) LMDB: ReidImageDataset (LMDB get -> TorchCodec decode -> v2 transforms on uint8
    tensors -> float), the training path of dmf.
(a') with ``--torchvision``: the same with the decoder before TorchCodec (torchvision.io's
    ``decode_image``, deprecated since torchvision 0.29), in the same rounds; the breakdown then
    times both decoders and says whether their tensors are equal.
(b) folder: the torchreid way, ``Image.open(path).convert("RGB")`` then the same augmentations
    applied to the PIL image (v2 transforms accept PIL like torchreid's v1 ones), ToImage, float.

Both: paper profile (source 128x64 -> 256x128, flip 0.5, pad 10 + crop, erasing 0.5, mean/std
0.5), batch 64, sequential indices, ``--workers`` workers, files in the page cache (warm).
Rounds alternate a/b; the best of each is reported. A single-process breakdown (us per image)
says where time goes: read, decode, augment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchcodec
import torchvision
from PIL import Image
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decoder_check import paired_us, torchvision_decode_to_tensor  # noqa: E402
from pack_speed import make_folder  # noqa: E402

from dmf_core.data.loading import loader as dmf_loader  # noqa: E402
from dmf_core.data.loading.loader import ReidImageDataset, build_train_transform, decode_to_tensor  # noqa: E402
from dmf_core.data.store.lmdb_store import LmdbReader, pack_split  # noqa: E402


@contextmanager
def decoder(fn):
    """ReidImageDataset decodes with ``fn`` (workers fork inside, so they inherit it)."""
    saved = dmf_loader.decode_to_tensor
    dmf_loader.decode_to_tensor = fn
    try:
        yield
    finally:
        dmf_loader.decode_to_tensor = saved


@dataclass(frozen=True)
class Paper:
    flip: float = 0.5
    pad: int = 10
    erasing: float = 0.5
    mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])


def pil_transform(height: int, width: int, aug: Paper) -> v2.Compose:
    """torchreid's order on PIL: Resize, flip, Pad, RandomCrop, ToTensor, Normalize, RandomErasing."""
    return v2.Compose([
        v2.Resize((height, width)), v2.RandomHorizontalFlip(aug.flip), v2.Pad(aug.pad),
        v2.RandomCrop((height, width)), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(aug.mean, aug.std), v2.RandomErasing(p=aug.erasing, value=0),
    ])


class FolderDataset(torch.utils.data.Dataset):
    def __init__(self, root: Path, image_ids: list[str], labels: np.ndarray, transform):
        self.paths = [str(root / i) for i in image_ids]
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        img = Image.open(self.paths[i]).convert("RGB")  # torchreid.utils.read_image
        return {"image": self.transform(img).as_subclass(torch.Tensor), "label": int(self.labels[i]),
                "index": i}


def through_loader(dataset, workers: int, batch: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers,
                                         drop_last=False, prefetch_factor=4 if workers else None)
    t = time.perf_counter()
    n = sum(len(b["label"]) for b in loader)
    return n / (time.perf_counter() - t)


def breakdown(reader: LmdbReader, root: Path, image_ids: list[str], height: int, width: int,
              aug: Paper, n: int, torchvision: bool = False) -> dict:
    torch.set_num_threads(1)  # as in a DataLoader worker
    idx = list(range(min(n, len(reader))))
    t_tensor = build_train_transform(height, width, aug)
    t_pil = pil_transform(height, width, aug)

    def per_image(fn, items) -> float:
        t = time.perf_counter()
        out = [fn(x) for x in items]
        return (time.perf_counter() - t) / len(items) * 1e6, out

    lmdb_read, blobs = per_image(reader.get_bytes, idx)
    decode, tensors = per_image(decode_to_tensor, blobs)
    tensor_aug, _ = per_image(t_tensor, tensors)
    before = {}
    if torchvision:  # both on each image in turn, best of 7 per image: a change of load hits both alike
        paired = paired_us(torchvision_decode_to_tensor, decode_to_tensor, blobs, 7)
        old = [torchvision_decode_to_tensor(data) for data in blobs]
        decode = paired["torchcodec_us"]
        before = {"decode_torchvision": paired["torchvision_us"],
                  "decode_ratio_median": paired["torchcodec_over_torchvision_median"],
                  "decoded_equal": all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(tensors, old))}
    paths = [root / image_ids[i] for i in idx]
    file_read, _ = per_image(lambda p: p.read_bytes(), paths)
    pil_open_decode, pils = per_image(lambda p: Image.open(p).convert("RGB"), paths)
    pil_aug, _ = per_image(t_pil, pils)
    return {
        "lmdb_us": {"read": round(lmdb_read, 1), "decode": round(decode, 1), **before,
                    "augment": round(tensor_aug, 1)},
        "folder_us": {"read(open+read bytes)": round(file_read, 1),
                      "read+decode(PIL open+convert)": round(pil_open_decode, 1),
                      "augment(PIL)": round(pil_aug, 1)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--torchvision", action="store_true",
                    help="also the LMDB path with torchvision.io's decoder (before TorchCodec), same rounds")
    args = ap.parse_args()
    aug = Paper()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        root = work / "raw"
        rows = make_folder(root, args.images, 128, 64)
        out = work / "lmdb" / "bench-train.lmdb"
        pack_split(rows, root, out, relabel=True)
        lmdb_ds = ReidImageDataset(out, build_train_transform(args.height, args.width, aug), augment_seed=0)
        side = lmdb_ds.sidecar
        folder_ds = FolderDataset(root, side["image_id"].tolist(), lmdb_ds.labels,
                                  pil_transform(args.height, args.width, aug))
        rates = {"lmdb": [], "folder": []} | ({"lmdb_torchvision": []} if args.torchvision else {})
        through_loader(lmdb_ds, args.workers, args.batch)  # warm-up (page cache, worker start)
        through_loader(folder_ds, args.workers, args.batch)
        for _ in range(args.rounds):
            rates["lmdb"].append(through_loader(lmdb_ds, args.workers, args.batch))
            if args.torchvision:
                with decoder(torchvision_decode_to_tensor):
                    rates["lmdb_torchvision"].append(through_loader(lmdb_ds, args.workers, args.batch))
            rates["folder"].append(through_loader(folder_ds, args.workers, args.batch))
        best = {k: max(v) for k, v in rates.items()}
        result = {
            "images": args.images, "workers": args.workers, "batch": args.batch,
            "out_size": [args.height, args.width],
            "samples_per_s": {k: [round(x) for x in v] for k, v in rates.items()},
            "best_samples_per_s": {k: round(v) for k, v in best.items()},
            "speedup_lmdb_over_folder": round(best["lmdb"] / best["folder"], 2),
            "speedup_median": round(float(np.median(rates["lmdb"]) / np.median(rates["folder"])), 2),
            **({"torchcodec_over_torchvision": round(best["lmdb"] / best["lmdb_torchvision"], 2),
                "torchcodec_over_torchvision_median":
                    round(float(np.median(rates["lmdb"]) / np.median(rates["lmdb_torchvision"])), 2)}
               if args.torchvision else {}),
            "breakdown_single_process": breakdown(lmdb_ds.reader, root, side["image_id"].tolist(),
                                                  args.height, args.width, aug, 1000, args.torchvision),
            "cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "torchcodec": torchcodec.__version__,
        }
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
