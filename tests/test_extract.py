"""Safe, atomic extraction: zip-slip, escaping links, truncation, disk space, interruption."""

from __future__ import annotations

import io
import os
import tarfile
import warnings
import zipfile

import pytest
from _archives import build_market, make_tar, make_zip, tar_with_members

from dmf_core.data import disk
from dmf_core.data.sources import extract
from dmf_core.data.sources.extract import (
    ArchiveError,
    InsufficientSpaceError,
    UnsafeArchiveError,
    read_marker,
    safe_extract,
)
from dmf_core.data.sources.layouts import parse_layout


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
    monkeypatch.setattr(disk, "free_bytes", lambda path: 1024)  # simulate a nearly full disk
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


# --------------------------------------------------------------------------------------------- links on disk
# The text checks in list_members see each link alone; these archives are built so that every link
# looks harmless as text and only the state on disk at creation time shows the escape.

SENTINEL = b"original content, must survive"


def _hostile(fmt: str, path, spec) -> object:
    """An archive from ("file", name, data) / ("link", name, target) / ("hard", name, target) / ("dir", name)."""
    if fmt == "zip":
        with zipfile.ZipFile(path, "w") as zf, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # duplicate names are part of some attacks
            for kind, name, *rest in spec:
                if kind == "link":
                    info = zipfile.ZipInfo(name)
                    info.external_attr = 0o120777 << 16  # S_IFLNK: how Info-ZIP stores symlinks
                    zf.writestr(info, rest[0])
                elif kind == "dir":
                    zf.writestr(name.rstrip("/") + "/", b"")
                else:
                    assert kind == "file", "zip has no hard links"
                    zf.writestr(name, rest[0])
        return path
    kinds = {"file": tarfile.REGTYPE, "link": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE, "dir": tarfile.DIRTYPE}
    members = []
    for kind, name, *rest in spec:
        data = rest[0] if kind == "file" else None
        members.append((_tarinfo(name, kinds[kind], rest[0] if kind in ("link", "hard") else ""), data))
    return tar_with_members(path, members)


def _outside(tmp_path) -> dict:
    """Everything under tmp_path but the extraction folder out/: paths, link targets and bytes."""
    seen = {}
    for p in sorted(tmp_path.rglob("*")):
        rel = p.relative_to(tmp_path).as_posix()
        if rel == "out" or rel.startswith("out/"):
            continue
        seen[rel] = ("link", os.readlink(p)) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
    return seen


@pytest.fixture()
def sentinel(tmp_path):
    """A file next to the extraction folder that no archive may change, and the check that none did."""
    (tmp_path / "sentinel.txt").write_bytes(SENTINEL)

    def untouched(before: dict) -> None:
        assert (tmp_path / "sentinel.txt").read_bytes() == SENTINEL
        assert _outside(tmp_path) == before  # nothing new, changed or removed outside out/
        assert not (tmp_path / "out" / "t").exists()
        out = tmp_path / "out"  # absent when the text checks refused before writing anything
        assert not out.exists() or list(out.iterdir()) == []  # the temp folder is gone too

    return untouched


def _refused(tmp_path, sentinel, archive, match: str, marker=None) -> None:
    before = _outside(tmp_path)
    with pytest.raises(UnsafeArchiveError, match=match):
        safe_extract(archive, tmp_path / "out" / "t", marker=marker, progress=False)
    sentinel(before)


# target = out/t, extracted in out/.t.extracting-PID: "../.." from its root is tmp_path, where the
# sentinel lives
CHAIN = [("link", "a/b", ".."), ("link", "a/b/c", "../..")]


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
@pytest.mark.parametrize("through", ["c/sentinel.txt", "a/b/c/sentinel.txt"])
def test_chained_links_cannot_escape(tmp_path, sentinel, fmt, through):
    """a/b -> .. and a/b/c -> ../.. both look inside; on disk c lands at the root, two levels up."""
    archive = _hostile(fmt, tmp_path / f"chain.{fmt}", [*CHAIN, ("file", through, b"pwned")])
    _refused(tmp_path, sentinel, archive, r"symlink 'a/b/c' -> '\.\./\.\.' leads outside the target")


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_marker_cannot_be_aimed_outside_by_a_chain(tmp_path, sentinel, fmt):
    """The extractor's own .dmf_source.json, a link to c/sentinel.txt: refused before the marker is written."""
    archive = _hostile(fmt, tmp_path / f"mk.{fmt}", [*CHAIN, ("link", ".dmf_source.json", "c/sentinel.txt")])
    _refused(tmp_path, sentinel, archive, r"symlink 'a/b/c'", marker={"sha256": "x"})


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_absolute_link_refused(tmp_path, sentinel, fmt):
    archive = _hostile(fmt, tmp_path / f"abs.{fmt}", [
        ("link", "d/abs", str(tmp_path)), ("file", "d/abs/sentinel.txt", b"pwned")])
    _refused(tmp_path, sentinel, archive, r"symlink 'd/abs' -> .* is absolute")


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_link_turned_outward_by_a_later_link_refused(tmp_path, sentinel, fmt):
    """b -> d/.. is the root while d is missing; d -> . then makes it the root's parent."""
    archive = _hostile(fmt, tmp_path / f"late.{fmt}", [
        ("link", "b", "d/.."), ("link", "d", "."), ("file", "b/out/sentinel.txt", b"pwned")])
    _refused(tmp_path, sentinel, archive, r"member 'b/out/sentinel.txt' leads outside the target")


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_escaping_link_left_in_the_dataset_refused(tmp_path, sentinel, fmt):
    """The same two links alone: nothing is written through b, but b must not reach the final dataset."""
    archive = _hostile(fmt, tmp_path / f"left.{fmt}", [("link", "b", "d/.."), ("link", "d", ".")])
    _refused(tmp_path, sentinel, archive, r"symlink 'b' -> 'd/\.\.' leads outside the target")


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_member_written_through_an_earlier_link_refused(tmp_path, sentinel, fmt):
    """A member whose own path is an earlier symlink would overwrite whatever the link points to."""
    archive = _hostile(fmt, tmp_path / f"over.{fmt}", [
        ("file", "d/file.txt", b"data"), ("link", "l", "d/file.txt"), ("file", "l", b"overwrite")])
    _refused(tmp_path, sentinel, archive, r"member 'l' would be written through the symlink 'l' -> 'd/file.txt'")


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_links_that_stay_inside_are_extracted(tmp_path, fmt):
    """A dataset may use inner links, even as a parent folder; zip links become links, not text files."""
    archive = _hostile(fmt, tmp_path / f"ok.{fmt}", [
        ("file", "d/file.txt", b"data"), ("link", "alias", "d"), ("file", "alias/new.txt", b"new"),
        ("link", "d/sub/up", "../file.txt"), ("file", "d/file.txt", b"data2")])
    target = safe_extract(archive, tmp_path / "t", progress=False)
    assert (target / "alias").is_symlink() and (target / "d" / "sub" / "up").is_symlink()
    assert (target / "d" / "new.txt").read_bytes() == b"new"
    assert (target / "d" / "sub" / "up").read_bytes() == b"data2"  # duplicate member: the later one wins


@pytest.mark.parametrize("spec, match", [
    ([("link", "s", "d/file.txt"), ("hard", "h", "s")], "hard link 'h' -> 's' does not point"),
    ([("link", "up", "d"), ("hard", "h", "up/file.txt")], "hard link 'h' -> 'up/file.txt' does not point"),
    ([("file", "f", b"x"), ("link", "f", "d/file.txt"), ("hard", "h", "f")], "hard link 'h' -> 'f' does not point"),
    ([("hard", "h", "../sentinel.txt")], "hard link 'h' -> '../sentinel.txt' points outside"),
], ids=["to-a-symlink", "through-a-link", "to-a-replaced-file", "to-outside"])
def test_hardlink_to_a_link_or_outside_refused(tmp_path, sentinel, spec, match):
    archive = _hostile("tar.gz", tmp_path / "hl.tar.gz", [("file", "d/file.txt", b"data"), *spec])
    _refused(tmp_path, sentinel, archive, match)


def _unchecked_members(archive) -> list:
    """The tar's members with *none* of list_members' text checks (to test the on-disk line alone)."""
    kinds = {tarfile.REGTYPE: "file", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink",
             tarfile.DIRTYPE: "dir"}
    with tarfile.open(archive) as tf:
        return [extract.Member(i.name, kinds[i.type], i.size, i.linkname or None, i) for i in tf.getmembers()]


@pytest.mark.parametrize("spec, match", [
    ([("link", "up", ".."), ("file", "up/sentinel.txt", b"pwned")], r"symlink 'up' -> '\.\.' leads outside"),
    ([*CHAIN, ("file", "c/sentinel.txt", b"pwned")], r"symlink 'a/b/c' -> '\.\./\.\.' leads outside"),
    ([("link", "abs", "/"), ("file", "abs/x", b"pwned")], r"symlink 'abs' -> '/' is absolute"),
    ([("hard", "h", "../../sentinel.txt")], r"hard link 'h' -> '\.\./\.\./sentinel.txt' does not point"),
    ([("link", "s", "../../sentinel.txt"), ("hard", "h", "s")], r"symlink 's'"),
], ids=["dotdot-link", "chain", "absolute", "hardlink-outside", "hardlink-to-escaping-link"])
def test_on_disk_checks_hold_without_text_checks_or_data_filter(tmp_path, sentinel, monkeypatch, spec, match):
    """The resolved-path checks alone (no list_members, stdlib data filter made a no-op as if bypassed)."""
    monkeypatch.setattr(tarfile, "data_filter", lambda member, dest: member)
    archive = _hostile("tar.gz", tmp_path / "raw.tar.gz", spec)
    root = tmp_path / "out" / ".t.extracting-test"
    root.mkdir(parents=True)
    before = _outside(tmp_path)
    with pytest.raises(UnsafeArchiveError, match=match):
        extract._extract_into(archive, "tar", _unchecked_members(archive), root, False)
    assert (tmp_path / "sentinel.txt").read_bytes() == SENTINEL and _outside(tmp_path) == before


def test_data_filter_alone_still_refuses_the_chain(tmp_path, sentinel, monkeypatch):
    """With our own resolver made naive, the stdlib PEP 706 filter (second opinion) catches the chain."""
    monkeypatch.setattr(extract._Tree, "resolve", lambda self, start, rel, what: os.path.join(start, rel))
    archive = _hostile("tar.gz", tmp_path / "chain.tar.gz", [*CHAIN, ("file", "c/sentinel.txt", b"pwned")])
    _refused(tmp_path, sentinel, archive, r"member 'a/b/c' refused by tarfile's data filter")


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_data_filter_sees_every_member(tmp_path, monkeypatch, fmt):
    seen = []
    real = tarfile.data_filter
    monkeypatch.setattr(tarfile, "data_filter", lambda m, dest: seen.append((m.name, dest)) or real(m, dest))
    archive = _hostile(fmt, tmp_path / f"ok.{fmt}", [("file", "d/a.txt", b"1"), ("link", "d/l", "a.txt")])
    safe_extract(archive, tmp_path / "out" / "t", progress=False)
    assert [name for name, _ in seen] == ["d/a.txt", "d/l"]
    assert all(os.path.basename(dest).startswith(".t.extracting-") for _, dest in seen)


def test_marker_not_written_through_a_symlink(tmp_path):
    """A link planted at the marker's path: the marker replaces the link, the file it named is untouched."""
    outside = tmp_path / "elsewhere.json"
    outside.write_text('{"sha256": "forged"}')
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / extract.MARKER).symlink_to(outside)
    assert read_marker(folder) is None  # a linked marker is never trusted either
    extract._write_marker(folder, {"sha256": "real"})
    assert outside.read_text() == '{"sha256": "forged"}'
    assert not (folder / extract.MARKER).is_symlink()
    assert read_marker(folder) == {"sha256": "real"}


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_marker_replaces_an_archive_link_at_its_path(tmp_path, fmt):
    archive = _hostile(fmt, tmp_path / f"mk.{fmt}", [
        ("file", "d/file.txt", b"data"), ("link", extract.MARKER, "d/file.txt")])
    target = safe_extract(archive, tmp_path / "t", marker={"sha256": "x"}, progress=False)
    assert (target / "d" / "file.txt").read_bytes() == b"data"
    assert not (target / extract.MARKER).is_symlink() and read_marker(target) == {"sha256": "x"}


def test_zip_symlink_longer_than_a_path_refused(tmp_path):
    archive = _hostile("zip", tmp_path / "long.zip", [("link", "l", "a/" * 5000)])
    with pytest.raises(UnsafeArchiveError, match=r"symlink 'l' has a 10000-byte target"):
        safe_extract(archive, tmp_path / "t", progress=False)


def test_hardlink_copies_count_for_disk_space(tmp_path):
    """Each hard link is extracted as a copy: 1 MiB + 9 links needs 10 MiB, not 1."""
    spec = [("file", "big.bin", b"\0" * (1 << 20))] + [("hard", f"h{i}", "big.bin") for i in range(9)]
    archive = _hostile("tar.gz", tmp_path / "hl.tar.gz", spec)
    with pytest.raises(InsufficientSpaceError, match=r"needs 10\.0 MiB"):
        safe_extract(archive, tmp_path / "t", free_space=lambda p: 20 << 20, progress=False)
    target = safe_extract(archive, tmp_path / "t", progress=False)
    assert (target / "h8").stat().st_size == 1 << 20 and (target / "h8").stat().st_nlink == 1
