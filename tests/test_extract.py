"""Safe, atomic extraction: zip-slip, escaping links, truncation, disk space, interruption."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pytest
from _archives import build_market, make_tar, make_zip, tar_with_members

from dmf_core.data import extract
from dmf_core.data.extract import (
    ArchiveError,
    InsufficientSpaceError,
    UnsafeArchiveError,
    read_marker,
    safe_extract,
)
from dmf_core.data.layouts import parse_layout


def _tarinfo(name: str, kind=tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_good_extraction_with_marker(tmp_path, fmt):
    src = tmp_path / "src"
    build_market(src)
    archive = (make_zip if fmt == "zip" else make_tar)(src, tmp_path / f"m.{fmt}")
    target = tmp_path / "raw" / "market1501"
    safe_extract(archive, target, marker={"sha256": "x"}, progress=False)
    assert read_marker(target) == {"sha256": "x"}
    assert len(parse_layout("market", target, "m")) == len(parse_layout("market", src, "m"))
    assert [p.name for p in target.parent.iterdir()] == ["market1501"]  # no temp dirs left
    # extracting again replaces the old tree atomically
    (target / "stale.txt").write_text("old")
    safe_extract(archive, target, progress=False)
    assert not (target / "stale.txt").exists()


def test_zip_slip_refused(tmp_path):
    archive = tmp_path / "slip.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok/a.txt", "fine")
        zf.writestr("../../evil.txt", "pwned")
    with pytest.raises(UnsafeArchiveError, match=r"'\.\./\.\./evil.txt'.*zip-slip"):
        safe_extract(archive, tmp_path / "out" / "t", progress=False)
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "out").exists()  # nothing written before the check


@pytest.mark.parametrize("name", ["/etc/evil", "C:\\evil.txt", "a/../../evil"])
def test_tar_absolute_and_dotdot_refused(tmp_path, name):
    archive = tar_with_members(tmp_path / "bad.tar.gz", [(_tarinfo(name), b"x")])
    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive, tmp_path / "t", progress=False)


@pytest.mark.parametrize("link", ["../../outside", "/etc/passwd", "a/../../../x"])
def test_escaping_symlink_refused(tmp_path, link):
    archive = tar_with_members(tmp_path / "sym.tar.gz", [
        (_tarinfo("d/file.txt"), b"ok"),
        (_tarinfo("d/link", tarfile.SYMTYPE, link), None),
    ])
    with pytest.raises(UnsafeArchiveError, match="symlink"):
        safe_extract(archive, tmp_path / "t", progress=False)
    assert not (tmp_path / "t").exists()


def test_escaping_zip_symlink_refused(tmp_path):
    archive = tmp_path / "sym.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "../../etc")
    with pytest.raises(UnsafeArchiveError, match="symlink"):
        safe_extract(archive, tmp_path / "t", progress=False)


def test_inner_symlink_and_hardlink_ok(tmp_path):
    archive = tar_with_members(tmp_path / "ok.tar.gz", [
        (_tarinfo("d/file.txt"), b"data"),
        (_tarinfo("d/sub/link", tarfile.SYMTYPE, "../file.txt"), None),
        (_tarinfo("d/hard", tarfile.LNKTYPE, "d/file.txt"), None),
    ])
    target = safe_extract(archive, tmp_path / "t", progress=False)
    assert (target / "d" / "sub" / "link").read_bytes() == b"data"
    assert (target / "d" / "hard").read_bytes() == b"data"


@pytest.mark.parametrize("link", ["../../etc/passwd", "d/missing.txt"])
def test_bad_hardlink_refused(tmp_path, link):
    archive = tar_with_members(tmp_path / "hl.tar.gz", [
        (_tarinfo("d/file.txt"), b"data"),
        (_tarinfo("d/hard", tarfile.LNKTYPE, link), None),
    ])
    with pytest.raises(UnsafeArchiveError, match="hard link"):
        safe_extract(archive, tmp_path / "t", progress=False)


def test_device_member_refused(tmp_path):
    archive = tar_with_members(tmp_path / "dev.tar.gz", [(_tarinfo("fifo", tarfile.FIFOTYPE), None)])
    with pytest.raises(UnsafeArchiveError, match="device or fifo"):
        safe_extract(archive, tmp_path / "t", progress=False)


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_truncated_archive(tmp_path, fmt):
    src = tmp_path / "src"
    build_market(src, train_ids=20)
    archive = (make_zip if fmt == "zip" else make_tar)(src, tmp_path / f"m.{fmt}")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) * 2 // 3])
    target = tmp_path / "raw" / "m"
    with pytest.raises(ArchiveError, match=r"m\.(zip|tar\.gz)"):
        safe_extract(archive, target, progress=False)
    assert not target.exists()
    assert not (tmp_path / "raw").exists() or list((tmp_path / "raw").iterdir()) == []


def test_corrupt_zip_member_crc(tmp_path):
    archive = tmp_path / "crc.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("a.bin", b"A" * 1000)
    data = bytearray(archive.read_bytes())
    pos = data.find(b"A" * 1000)
    data[pos + 10] = ord("B")  # flip a byte of the stored content
    archive.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="a.bin"):
        safe_extract(archive, tmp_path / "t", progress=False)
    assert not (tmp_path / "t").exists()


def test_not_an_archive(tmp_path):
    f = tmp_path / "x.zip"
    f.write_bytes(b"hello world" * 10)
    with pytest.raises(ArchiveError, match="not a readable zip or tar"):
        safe_extract(f, tmp_path / "t", progress=False)


def test_too_little_disk_space(tmp_path, monkeypatch):
    src = tmp_path / "src"
    build_market(src)
    archive = make_zip(src, tmp_path / "m.zip")
    monkeypatch.setattr(extract, "free_bytes", lambda path: 1024)  # simulate a nearly full disk
    with pytest.raises(InsufficientSpaceError, match="only 1.0 KiB are free"):
        safe_extract(archive, tmp_path / "raw" / "m", progress=False)
    assert not (tmp_path / "raw" / "m").exists()
    # the injectable form works too
    with pytest.raises(InsufficientSpaceError):
        safe_extract(archive, tmp_path / "raw" / "m", free_space=lambda p: 0, progress=False)


def test_interrupted_extraction_leaves_no_half_dataset(tmp_path, monkeypatch):
    src = tmp_path / "src"
    build_market(src)
    archive = make_zip(src, tmp_path / "m.zip")
    target = tmp_path / "raw" / "m"
    safe_extract(archive, target, marker={"sha256": "old"}, progress=False)
    calls = {"n": 0}
    real_copy = extract._copy

    def flaky(src_f, dst_f):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        real_copy(src_f, dst_f)

    monkeypatch.setattr(extract, "_copy", flaky)
    with pytest.raises(KeyboardInterrupt):
        safe_extract(archive, target, marker={"sha256": "new"}, progress=False)
    assert read_marker(target) == {"sha256": "old"}  # the previous complete dataset is untouched
    assert [p.name for p in target.parent.iterdir()] == ["m"]


def test_stale_temp_dir_cleaned(tmp_path):
    stale = tmp_path / "raw" / ".m.extracting-999999"
    stale.mkdir(parents=True)
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("f.txt", io.BytesIO(b"1").getvalue())
    safe_extract(archive, tmp_path / "raw" / "m", progress=False)
    assert not stale.exists()


def test_deflate64_zip_gets_a_clear_error(tmp_path):
    archive = tmp_path / "d64.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("a.txt", b"hello")
    data = bytearray(archive.read_bytes())
    central = data.find(b"PK\x01\x02")
    data[central + 10:central + 12] = (9).to_bytes(2, "little")  # method 9 = Deflate64
    archive.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="Deflate64"):
        safe_extract(archive, tmp_path / "t", progress=False)


def test_windows_separators_become_folders(tmp_path):
    from _archives import jpeg_bytes

    archive = tmp_path / "win.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for split in ("bounding_box_train", "query", "bounding_box_test"):
            zf.writestr(f"Market-1501-v15.09.15\\{split}\\0001_c1s1_000001_01.jpg", jpeg_bytes())
    target = safe_extract(archive, tmp_path / "t", progress=False)
    df = parse_layout("market", target, "m")
    assert df["image_id"].str.startswith("Market-1501-v15.09.15/").all() and len(df) == 3
