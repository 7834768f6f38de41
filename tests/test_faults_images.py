"""Fault injection, images: an image that declares more pixels than PIL's decompression-bomb
limit is refused from its header on every decode path, before any decoder runs.

Paths: verification (thread pool), packing, the training loader, the eval (test) loader, and the
helpers behind them (dmf_core/data/images.py). The bombs are crafted PNGs: a valid IHDR that
declares the size, a tiny IDAT. 200000x200000 is over 2x the limit (PIL refuses at open), 10000x10000
between 1x and 2x (PIL only warns; refused here too).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pandas as pd
import pytest
from _faults import env_with_venv, good_jpeg, png_with_header
from PIL import Image, ImageFile

from dmf_core.data import images
from dmf_core.data.loading import loader
from dmf_core.data.sources.manifest import verify_images
from dmf_core.data.store import lmdb_store

ROOT = Path(__file__).resolve().parents[1]

BOMBS = {"over_2x": (200_000, 200_000), "over_1x": (10_000, 10_000)}
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


class Aug:  # the fields of dmf_core.config.AugmentConfig
    flip, pad, erasing = 0.5, 2, 0.5
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


@pytest.fixture()
def no_decoder(monkeypatch):
    """Every decoder raises if reached: PIL's load() and TorchCodec's (loader._codec_decode)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a decoder ran on an image over the pixel limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(loader, "_codec_decode", refuse)


def _raw_tree(root: Path, bomb: bytes, ids: int = 2, per_id: int = 2) -> pd.DataFrame:
    """A folder of bombs named like Market images, and their manifest rows."""
    rows = []
    for pid in range(ids):
        for j in range(per_id):
            rel = f"bad/{pid:04d}_c1s1_{j:06d}_01.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(bomb)
            rows.append((rel, pid))
    return pd.DataFrame({"image_id": [r for r, _ in rows], "split": "train", "pid": [p for _, p in rows],
                         "camid": 0, "dataset": "bombs"})


def _lmdb_of_bombs(tmp_path: Path, bomb: bytes, monkeypatch) -> tuple[Path, pd.DataFrame]:
    """An LMDB whose stored values are bombs (the pack stage refuses them, so it is told here
    they are 2x2 images): what a corrupted or hand-made LMDB would hand the loaders."""
    df = _raw_tree(tmp_path / "raw", bomb)
    with monkeypatch.context() as m:
        m.setattr(lmdb_store, "decode_rgb", lambda data, name="": Image.new("RGB", (2, 2)))
        lmdb_store.pack_split(df, tmp_path / "raw", tmp_path / "bombs-train.lmdb", relabel=True, threads=1)
    return tmp_path / "bombs-train.lmdb", df


# --------------------------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("size", BOMBS.values(), ids=BOMBS.keys())
def test_open_checked_refuses_from_the_header(size, no_decoder):
    with pytest.raises(Image.DecompressionBombError, match=r"^huge\.png: .*MAX_IMAGE_PIXELS"):
        images.open_checked(png_with_header(*size), "huge.png")


def test_limit_is_pils_and_stays_on(monkeypatch):
    data = png_with_header(64, 64)
    assert images.open_checked(data).size == (64, 64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)  # a lowered limit is obeyed
    with pytest.raises(Image.DecompressionBombError, match="64x64 = 4096 pixels"):
        images.open_checked(data, "x")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # switched off: the default still holds
    with pytest.raises(Image.DecompressionBombError, match="89478485"):
        images.open_checked(png_with_header(*BOMBS["over_1x"]), "x")


def test_warnings_as_errors_still_give_the_refusal():
    """With ``-W error`` PIL raises its 1x-2x warning from open(); it is the same refusal."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Image.DecompressionBombError, match="^w.png: "):
            images.decode_rgb(png_with_header(*BOMBS["over_1x"]), "w.png")


def test_images_within_the_limit_decode_as_before():
    jpeg = good_jpeg(size=(64, 128))
    assert images.decode_rgb(jpeg).size == (64, 128)
    assert tuple(loader.decode_to_tensor(jpeg).shape) == (3, 128, 64)
    assert images.decode_rgb(png_with_header(2, 2)).size == (2, 2)


# --------------------------------------------------------------------------------------------- decode paths


@pytest.mark.parametrize("size", BOMBS.values(), ids=BOMBS.keys())
def test_verify_refuses_bombs_without_decoding(tmp_path, size, no_decoder, monkeypatch):
    """Verification runs in a thread pool: no warnings.catch_warnings there (not thread-safe)."""
    real = warnings.catch_warnings

    def shared_state(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            raise AssertionError("warnings.catch_warnings used in the verification thread pool")
        return real(*args, **kwargs)  # pandas uses it in the calling thread: fine

    df = _raw_tree(tmp_path, png_with_header(*size), ids=4)
    filters = list(warnings.filters)
    report = tmp_path / "bad_images.txt"
    with monkeypatch.context() as m:  # only around the call: pytest itself uses it
        m.setattr(warnings, "catch_warnings", shared_state)
        failed = verify_images(df, tmp_path, report, workers=4)
    assert failed == sorted(df["image_id"])
    assert warnings.filters == filters
    for line in report.read_text().splitlines():
        image_id, reason = line.split("\t")
        assert reason.startswith(f"DecompressionBombError: {Path(image_id).name}: "), reason


@pytest.mark.parametrize("size", BOMBS.values(), ids=BOMBS.keys())
def test_pack_refuses_bombs_without_decoding(tmp_path, size, no_decoder):
    df = _raw_tree(tmp_path / "raw", png_with_header(*size))
    out = tmp_path / "lmdb" / "b-train.lmdb"
    with pytest.raises(ValueError, match=r"bad/0000_c1s1_000000_01\.png: does not decode: DecompressionBombError"):
        lmdb_store.pack_split(df, tmp_path / "raw", out, threads=2)
    rep = lmdb_store.pack_split(df, tmp_path / "raw", out, threads=2, on_corrupt="skip")
    assert rep.count == 0 and len(rep.skipped) == len(df)
    assert all("DecompressionBombError" in reason for _, reason in rep.skipped)


@pytest.mark.parametrize("size", BOMBS.values(), ids=BOMBS.keys())
def test_train_loader_refuses_bombs_without_decoding(tmp_path, size, monkeypatch):
    path, _ = _lmdb_of_bombs(tmp_path, png_with_header(*size), monkeypatch)
    train = loader.build_train_loader(path, Aug(), 32, 16, P=2, K=2, seed=0)
    monkeypatch.setattr(loader, "_codec_decode", lambda *a, **k: pytest.fail("TorchCodec decoder called"))
    with pytest.raises(Image.DecompressionBombError, match=r"bombs-train\.lmdb: bad/\d{4}_c1s1_\d{6}_01\.png: "):
        next(iter(train))


@pytest.mark.parametrize("size", BOMBS.values(), ids=BOMBS.keys())
def test_eval_loader_refuses_bombs_without_decoding(tmp_path, size, monkeypatch):
    path, _ = _lmdb_of_bombs(tmp_path, png_with_header(*size), monkeypatch)
    test = loader.build_test_loader(path, Aug(), 32, 16, batch_size=4)
    monkeypatch.setattr(loader, "_codec_decode", lambda *a, **k: pytest.fail("TorchCodec decoder called"))
    with pytest.raises(Image.DecompressionBombError, match=r"bombs-train\.lmdb: bad/0000_c1s1_000000_01\.png: "):
        next(iter(test))


_MEMORY_PROBE = """
import json, resource, sys
from pathlib import Path
from PIL import Image
from dmf_core.data.loading import loader
from dmf_core.data.images import decode_rgb
from dmf_core.data.sources.manifest import verify_images
import pandas as pd

tmp, raw = Path(sys.argv[1]), Path(sys.argv[2])
refused = {}
def attempt(name, fn):
    try:
        fn()
        refused[name] = False
    except Image.DecompressionBombError:
        refused[name] = True
df = pd.read_json(tmp / "rows.json")
verify_images(df, raw, tmp / "report.txt", workers=2)
refused["verify"] = len((tmp / "report.txt").read_text().splitlines()) == len(df)
attempt("pack", lambda: decode_rgb((raw / df["image_id"][0]).read_bytes(), "x"))
class Aug:
    flip, pad, erasing, mean, std = 0.5, 2, 0.5, [0.5] * 3, [0.5] * 3
lmdb = tmp / "bombs-train.lmdb"
attempt("train", lambda: next(iter(loader.build_train_loader(lmdb, Aug(), 32, 16, P=2, K=2, seed=0))))
attempt("eval", lambda: next(iter(loader.build_test_loader(lmdb, Aug(), 32, 16, batch_size=4))))
attempt("decode_to_tensor", lambda: loader.decode_to_tensor((raw / df["image_id"][0]).read_bytes()))
print(json.dumps({"refused": refused, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def test_every_path_refuses_the_200000_square_png_with_low_memory(tmp_path, monkeypatch):
    """The real decoders (nothing patched), in a fresh process: every path refuses the
    200000x200000 PNG and the process peaks far below the 120 GB torchvision would request."""
    path, df = _lmdb_of_bombs(tmp_path, png_with_header(*BOMBS["over_2x"]), monkeypatch)
    df.to_json(tmp_path / "rows.json")
    proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(tmp_path), str(tmp_path / "raw")],
                          cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["refused"] == dict.fromkeys(["verify", "pack", "train", "eval", "decode_to_tensor"], True)
    assert result["maxrss_kib"] < 2 * 1024 * 1024, result  # torch itself takes a few hundred MB
