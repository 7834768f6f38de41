"""Fault injection, hostile files: archives, images, pickles (see docs/reliability.md).

Complements test_extract.py (zip-slip, escaping and chained links, hard links, the marker,
truncation), test_layouts.py / test_lmdb.py (truncated and garbage JPEGs) with the cases they do
not build.
"""

from __future__ import annotations

import io
import tarfile
import warnings
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from _faults import evil_torch_file, good_jpeg, hostile_images
from PIL import Image

from dmf_core.data import disk
from dmf_core.data.images import decode_rgb
from dmf_core.data.sources import extract
from dmf_core.data.sources.extract import InsufficientSpaceError, UnsafeArchiveError, safe_extract
from dmf_core.data.sources.manifest import verify_images
from dmf_core.data.store import lmdb_store
from dmf_core.data.store.lmdb_store import LmdbReader, pack_split

# --------------------------------------------------------------------------------------------- archives


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, kind=tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    return info


@pytest.mark.parametrize("name", ["/tmp/dmf-evil.txt", "//server/evil.txt", "C:/evil.txt"])
def test_zip_absolute_member_refused(tmp_path, name):
    archive = tmp_path / "abs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", "fine")
        info = zipfile.ZipInfo("x")
        info.filename = name  # ZipInfo() would normalise it; a hostile archive does not
        zf.writestr(info, "pwned")
    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive, tmp_path / "out" / "t", progress=False)
    assert not (tmp_path / "out").exists()
    assert not Path("/tmp/dmf-evil.txt").exists()


@pytest.mark.parametrize("link", ["/etc/passwd", "../outside.txt", "d/../../outside.txt"])
def test_tar_hard_link_escaping_refused(tmp_path, link):
    (tmp_path / "outside.txt").write_text("secret")
    archive = _tar(tmp_path / "hl.tar.gz", [(_info("d/file.txt"), b"x"), (_info("d/h", tarfile.LNKTYPE, link), None)])
    with pytest.raises(UnsafeArchiveError, match="hard link"):
        safe_extract(archive, tmp_path / "out" / "t", progress=False)
    assert not (tmp_path / "out" / "t").exists()


def test_symlink_then_file_through_it_refused(tmp_path):
    """The classic two-step escape: an inner symlink to '..', then a member written through it."""
    archive = _tar(tmp_path / "two.tar.gz", [(_info("up", tarfile.SYMTYPE, ".."), None),
                                              (_info("up/escaped.txt"), b"pwned")])
    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive, tmp_path / "out" / "t", progress=False)
    assert not (tmp_path / "out" / "escaped.txt").exists()


def _realpath_bypass_tar(path: Path) -> Path:
    """The CVE-2025-4517 shape: 16 one-letter links to 247-char folders make a short name whose real
    path nears PATH_MAX; realpath() stops resolving past it (ENAMETOOLONG, non-strict) and so checks
    ``escape`` as text, while the kernel follows the short names to the root's parent."""
    comp, steps, path_so_far, members = "d" * 247, "abcdefghijklmnop", "", []
    for step in steps:
        members += [(_info(f"{path_so_far}{comp}", tarfile.DIRTYPE), None),
                    (_info(f"{path_so_far}{step}", tarfile.SYMTYPE, comp), None)]
        path_so_far += comp + "/"
    deep = "/".join(steps) + "/" + "l" * 254
    members += [(_info(deep, tarfile.SYMTYPE, "../" * len(steps)), None),
                (_info("escape", tarfile.SYMTYPE, deep + "/.."), None),
                (_info("escape/pwned.txt"), b"pwned")]
    return _tar(path, members)


def test_tar_realpath_bypass_cve_2025_4517_refused(tmp_path):
    """Python 3.11.7's own filter="data" lets this archive write out/pwned.txt; our resolver refuses it."""
    archive = _realpath_bypass_tar(tmp_path / "cve.tar.gz")
    with pytest.raises(UnsafeArchiveError, match=r"File name too long|leads outside"):
        safe_extract(archive, tmp_path / "out" / "t", progress=False)
    assert not (tmp_path / "out" / "pwned.txt").exists() and not (tmp_path / "pwned.txt").exists()
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_decompression_bomb_refused_before_writing(tmp_path, fmt, monkeypatch):
    """A tiny archive (~20 KiB) declaring 64 MiB of zeros, 8 MiB free: refused, nothing written."""
    zeros = b"\0" * (64 << 20)
    archive = tmp_path / f"bomb.{fmt}"
    if fmt == "zip":
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
            zf.writestr("zeros.bin", zeros)
    else:
        _tar(archive, [(_info("zeros.bin"), zeros)])
    assert archive.stat().st_size < 200_000
    writes = []
    monkeypatch.setattr(disk, "free_bytes", lambda path: 8 << 20)
    monkeypatch.setattr(extract, "_extract_into", lambda *a, **k: writes.append(a))
    target = tmp_path / "raw" / "bomb"
    with pytest.raises(InsufficientSpaceError, match=r"needs 64\.0 MiB"):
        safe_extract(archive, target, progress=False)
    assert writes == [] and not target.exists()
    assert [p.name for p in (tmp_path / "raw").iterdir()] == []


def test_zip_lying_about_sizes_is_not_written_past_its_declaration(tmp_path, monkeypatch):
    """Central directory says 10 bytes, the data inflates to 1 MiB: an error, never 1 MiB on disk."""
    archive = tmp_path / "liar.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.bin", b"\0" * (1 << 20))
    data = bytearray(archive.read_bytes())
    # patch the uncompressed size in the local header (offset 22) and central directory (offset 24)
    local = data.find(b"PK\x03\x04")
    data[local + 22:local + 26] = (10).to_bytes(4, "little")
    central = data.find(b"PK\x01\x02")
    data[central + 24:central + 28] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    target = tmp_path / "raw" / "liar"
    with pytest.raises(extract.ArchiveError, match="big.bin"):
        safe_extract(archive, target, progress=False)
    assert not target.exists()
    leftovers = [p for p in (tmp_path / "raw").rglob("*") if p.is_file()]
    assert all(p.stat().st_size <= 10 for p in leftovers)


# --------------------------------------------------------------------------------------------- images


@pytest.fixture()
def hostile_dataset(tmp_path):
    root = tmp_path / "raw"
    (root / "ok").mkdir(parents=True)
    (root / "bad").mkdir()
    rows = []
    for i in range(4):
        rel = f"ok/{i:04d}_c1s1_000001_01.jpg"
        (root / rel).write_bytes(good_jpeg(color=(40 * i, 90, 30)))
        rows.append((rel, i))
    bad = {}
    for i, (kind, data) in enumerate(sorted(hostile_images().items())):
        ext = ".png" if kind.startswith("png") else ".jpg"
        rel = f"bad/{kind}{ext}"
        (root / rel).write_bytes(data)
        rows.append((rel, 10 + i))
        bad[rel] = kind
    df = pd.DataFrame({"image_id": [r for r, _ in rows], "split": "train", "pid": [p for _, p in rows],
                       "camid": 0, "dataset": "hostile"})
    return root, df, bad


def test_verify_images_names_every_hostile_image(hostile_dataset, tmp_path):
    root, df, bad = hostile_dataset
    assert Image.MAX_IMAGE_PIXELS  # the guard is on in this process
    report = tmp_path / "bad_images.txt"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray DecompressionBombWarning either
        failed = verify_images(df, root, report, workers=2)
    assert failed == sorted(bad)
    reasons = dict(line.split("\t", 1) for line in report.read_text().splitlines())
    assert sorted(reasons) == sorted(bad)
    assert "DecompressionBomb" in reasons["bad/png_enormous.png"]


def test_enormous_image_is_refused_without_allocating(tmp_path):
    """Opening the 200000x200000 PNG raises at once (PIL bomb guard), before any pixel buffer."""
    path = tmp_path / "huge.png"
    path.write_bytes(hostile_images()["png_enormous"])
    with pytest.raises(Image.DecompressionBombError):
        decode_rgb(path.read_bytes())


def test_pack_fails_naming_the_first_hostile_image(hostile_dataset, tmp_path):
    root, df, bad = hostile_dataset
    out = tmp_path / "lmdb" / "h-train.lmdb"
    with pytest.raises(ValueError, match="bad/") as err:
        pack_split(df, root, out, on_corrupt="fail", threads=2)
    assert any(rel in str(err.value) for rel in bad)
    assert not out.exists() and not lmdb_store.partial_path(out).exists()
    assert not lmdb_store.sidecar_path(out).exists()


def test_pack_skip_lists_every_hostile_image_and_reads_back(hostile_dataset, tmp_path):
    root, df, bad = hostile_dataset
    out = tmp_path / "lmdb" / "h-train.lmdb"
    rep = pack_split(df, root, out, on_corrupt="skip", threads=2)
    assert sorted(i for i, _ in rep.skipped) == sorted(bad)
    assert rep.count == len(df) - len(bad)
    reader = LmdbReader(out)
    assert sorted(reader.sidecar["image_id"]) == sorted(set(df["image_id"]) - set(bad))
    for i in range(len(reader)):  # the later stages only ever see decodable images
        assert decode_rgb(reader.get_bytes(i)).size == (16, 32)


# --------------------------------------------------------------------------------------------- pickles


def test_vit_weight_loader_refuses_code_running_pickle(tmp_path):
    from dmf_core.model.vit import read_state_dict

    marker = tmp_path / "PWNED"
    path = evil_torch_file(tmp_path / "jx_vit_base_p16_224.pth", marker)
    with pytest.raises(Exception, match=r"(?i)weights.only|unsupported|global"):
        read_state_dict(path)
    assert not marker.exists()


def test_resume_checkpoint_with_code_running_pickle_is_ignored(tmp_path, caplog):
    from dmf_core.train.checkpoint import STATE_FILE, load_training_state

    marker = tmp_path / "PWNED"
    work = tmp_path / "runs" / "pretrain"
    work.mkdir(parents=True)
    evil_torch_file(work / STATE_FILE, marker, wrap=False)
    assert load_training_state(work) is None  # refused, logged, training starts over
    assert not marker.exists()
    assert "unreadable training state" in caplog.text


def test_model_checkpoint_is_safetensors_not_pickle(tmp_path):
    """Our model files carry no pickle at all: a .pth dropped next to them is never read."""
    from dmf_core.model import pretrained as checkpoint

    marker = tmp_path / "PWNED"
    model_dir = tmp_path / "models" / "pretrain"
    model_dir.mkdir(parents=True)
    evil_torch_file(model_dir / "model.pth", marker)
    with pytest.raises(FileNotFoundError):
        checkpoint.read_weights(model_dir)
    assert not marker.exists()
    # and weights written by the loop are plain safetensors
    from safetensors.torch import load_file, save_file

    save_file({"w": torch.ones(2)}, str(model_dir / "model.safetensors"))
    assert set(load_file(str(model_dir / "model.safetensors"))) == {"w"}


def test_model_file_bytes_do_not_depend_on_the_process(tmp_path):
    """safetensors orders __metadata__ by a per-process Rust HashMap; ours is sorted -> stable DVC hash."""
    import json as _json

    from safetensors import safe_open

    from dmf_core.model.pretrained import _save_safetensors_sorted

    state = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(1, dtype=torch.int64)}
    meta = {k: f"v{k}" for k in "zyxwvutsrq"}
    path = tmp_path / "model.safetensors"
    _save_safetensors_sorted(state, path, meta)
    raw = path.read_bytes()
    header = _json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert list(header["__metadata__"]) == sorted(meta)
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata() == meta and torch.equal(fh.get_tensor("b"), state["b"])
