"""torchvision.io (deprecated since 0.29) vs TorchCodec: the same pixels? how fast? On CPU, and on
CUDA (batched nvJPEG) when a GPU is there. docs/data_path.md, "Image decoder", records the results.

    .venv/bin/python benchmarks/decoder_check.py [--lmdb A.lmdb B.lmdb ...] [--images 2000] [--repeats 5]

Images: every value of the given LMDBs (the packed original bytes), else ``--images`` generated
128x64 JPEGs (pack_speed's generator), plus one of each kind the tests use (grey, CMYK,
progressive, 4:4:4 JPEGs; RGB, grey, palette, RGBA PNGs). CPU: the loader's
:func:`decode_to_tensor` (TorchCodec) against the same function before (torchvision.io's
``decode_image``): tensors compared, and timed with the bare decoders of both (one thread, both
on each image in turn, best of ``--repeats`` per image). CUDA: ``decode_jpeg(list,
device="cuda")`` of both in batches of ``--batch``, pixels compared, images/s (synchronised).
Prints JSON, with the load average.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torchcodec  # noqa: E402
import torchvision  # noqa: E402
from torchcodec.decoders import decode_image as codec_decode_image  # noqa: E402
from torchcodec.decoders import decode_jpeg as codec_decode_jpeg  # noqa: E402
from torchvision.io import ImageReadMode  # noqa: E402
from torchvision.io import decode_image as tv_decode_image  # noqa: E402
from torchvision.io import decode_jpeg as tv_decode_jpeg  # noqa: E402

from dmf_core.data.images import open_checked  # noqa: E402
from dmf_core.data.loading.loader import JPEG_MAGIC, decode_to_tensor  # noqa: E402

# This script calls torchvision's codecs on purpose, to compare them.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def lmdb_values(paths: list[Path]) -> list[bytes]:
    import lmdb
    out = []
    for path in paths:
        env = lmdb.open(str(path), readonly=True, lock=False, subdir=False)
        with env.begin() as txn:
            out += [bytes(v) for k, v in txn.cursor() if k != b"__meta__"]
        env.close()
    return out


def generated(n: int) -> list[bytes]:
    import tempfile

    from pack_speed import make_folder
    with tempfile.TemporaryDirectory() as tmp:
        rows = make_folder(Path(tmp), n, 128, 64)
        return [(Path(tmp) / r).read_bytes() for r in rows["image_id"]]


def test_kinds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (60, 30, 3), dtype=np.uint8)).resize((64, 128))

    def enc(img, fmt, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()
    return {"jpeg grey": enc(base.convert("L"), "JPEG"), "jpeg cmyk": enc(base.convert("CMYK"), "JPEG"),
            "jpeg progressive": enc(base, "JPEG", progressive=True, quality=90),
            "jpeg 4:4:4 q95": enc(base, "JPEG", quality=95, subsampling=0),
            "png rgb": enc(base, "PNG"), "png grey": enc(base.convert("L"), "PNG"),
            "png palette": enc(base.convert("P"), "PNG"), "png rgba": enc(base.convert("RGBA"), "PNG")}


def as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def torchvision_decode_to_tensor(data: bytes, name: str = "image") -> torch.Tensor:
    """The loader's ``decode_to_tensor`` before TorchCodec (commit 66de7e0): header check,
    ``torchvision.io.decode_image``, PIL fallback."""
    header = open_checked(data, name)
    try:
        return tv_decode_image(as_tensor(data), mode=ImageReadMode.RGB)
    except RuntimeError:
        header.load()
        im = header if header.mode == "RGB" else header.convert("RGB")
        return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def paired_us(first, second, items: list, repeats: int) -> dict:
    """Both functions on each item in turn (order alternating), best of ``repeats`` per item, so a
    change of load hits both alike: the mean of the per-item bests (us) and their median ratio."""
    best = np.full((2, len(items)), np.inf)
    fns = (first, second)
    for r in range(repeats):
        for i, item in enumerate(items):
            for k in ((0, 1) if (i + r) % 2 else (1, 0)):
                t = time.perf_counter()
                fns[k](item)
                best[k, i] = min(best[k, i], time.perf_counter() - t)
    return {"torchvision_us": round(float(best[0].mean()) * 1e6, 1),
            "torchcodec_us": round(float(best[1].mean()) * 1e6, 1),
            "torchcodec_over_torchvision_median": round(float(np.median(best[1] / best[0])), 3)}


def cpu_check(blobs: list[bytes], kinds: dict[str, bytes], repeats: int) -> dict:
    torch.set_num_threads(1)  # as in a DataLoader worker
    before = [torchvision_decode_to_tensor(b) for b in blobs]
    differ = sum(not same(a, decode_to_tensor(b)) for a, b in zip(before, blobs))
    kind_equal = {k: same(torchvision_decode_to_tensor(v), decode_to_tensor(v)) for k, v in kinds.items()}
    tensors = [as_tensor(b) for b in blobs]
    jpegs = [t for b, t in zip(blobs, tensors) if b[:3] == JPEG_MAGIC]
    return {"images": len(blobs), "jpegs": len(jpegs), "differ_from_torchvision": differ, "kinds_equal": kind_equal,
            "decode_to_tensor": paired_us(torchvision_decode_to_tensor, decode_to_tensor, blobs, repeats),
            "bare decode_image": paired_us(lambda t: tv_decode_image(t, mode=ImageReadMode.RGB),
                                           lambda t: codec_decode_image(t, mode="RGB"), tensors, repeats),
            "bare decode_jpeg": paired_us(lambda t: tv_decode_jpeg(t, mode=ImageReadMode.RGB),
                                          lambda t: codec_decode_jpeg(t, mode="RGB"), jpegs, repeats)}


def cuda_check(blobs: list[bytes], kinds: dict[str, bytes], batch: int, repeats: int) -> dict:
    device = torch.device("cuda")
    decoders = {"torchvision": lambda b: tv_decode_jpeg(b, mode=ImageReadMode.RGB, device=device),
                "torchcodec": lambda b: codec_decode_jpeg(b, mode="RGB", device=device)}

    def compare(group: list[torch.Tensor]) -> tuple[int, int, str | None]:
        """(images that differ, max |difference| where shapes agree, an error) for one batch."""
        try:
            tv, tc = decoders["torchvision"](group), decoders["torchcodec"](group)
        except RuntimeError as exc:
            return len(group), 0, f"{exc.__class__.__name__}: {str(exc)[:200]}"
        pairs = [(x.cpu(), y.cpu()) for x, y in zip(tv, tc)]
        diff = [int((x.int() - y.int()).abs().max()) for x, y in pairs if x.shape == y.shape]
        return sum(not same(x, y) for x, y in pairs), max(diff, default=0), None

    jpegs = [as_tensor(b) for b in blobs if b[:3] == JPEG_MAGIC]
    batches = [jpegs[i:i + batch] for i in range(0, len(jpegs), batch)]
    differ, max_diff, errors = 0, 0, []
    for group in batches:
        n, d, err = compare(group)
        differ, max_diff = differ + n, max(max_diff, d)
        errors += [err] if err else []
    kinds_equal = {}
    for name, data in kinds.items():
        if data[:3] == JPEG_MAGIC:
            n, d, err = compare([as_tensor(data)])
            kinds_equal[name] = err or (n == 0) or f"max |diff| {d}"
    rates: dict[str, list[float]] = {k: [] for k in decoders}
    for _ in range(repeats if not errors else 0):
        for name, run in decoders.items():
            torch.cuda.synchronize()
            t = time.perf_counter()
            for group in batches:
                run(group)
            torch.cuda.synchronize()
            rates[name].append(len(jpegs) / (time.perf_counter() - t))
    return {"gpu": torch.cuda.get_device_name(), "jpegs": len(jpegs), "batch": batch, "differ": differ,
            "max_abs_diff_same_shape": max_diff, "errors": errors[:3], "kinds_equal": kinds_equal,
            "images_per_s": {k: {"best": round(max(v)), "median": round(float(np.median(v)))}
                             for k, v in rates.items() if v}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lmdb", type=Path, nargs="*", default=[])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    blobs = lmdb_values(args.lmdb) if args.lmdb else generated(args.images)
    kinds = test_kinds()
    result = {"torch": torch.__version__, "torchvision": torchvision.__version__,
              "torchcodec": torchcodec.__version__, "source": [str(p) for p in args.lmdb] or "generated",
              "cpu": cpu_check(blobs, kinds, args.repeats)}
    if torch.cuda.is_available():
        result["cuda"] = cuda_check(blobs, kinds, args.batch, args.repeats)
    result.update(cpus=os.cpu_count(), loadavg=[round(x, 2) for x in os.getloadavg()])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
