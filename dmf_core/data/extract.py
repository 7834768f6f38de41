"""Safe extraction of zip and tar(.gz/.bz2/.xz) archives.

Every member is checked *before* anything is written: absolute paths, ``..`` components,
symlinks that resolve outside the target, hard links to anything but an earlier regular file
of the archive, and device/fifo members are refused. The uncompressed size is compared with the
free space first (``free_bytes`` is a module-level function so tests can monkeypatch it). The
archive is extracted into a temporary folder next to the target and renamed into place, so an
interrupted extraction never leaves a half dataset under the final name.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)

MARKER = ".dmf_source.json"  # written into an extracted dataset: which archive it came from
SPACE_MARGIN = 1.02  # need uncompressed size x margin + SPACE_SLACK bytes free
SPACE_SLACK = 16 << 20
_ZIP_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA})


class ArchiveError(ValueError):
    """Not a readable archive (truncated, corrupt, unknown format)."""


class UnsafeArchiveError(ArchiveError):
    """A member that would write outside the target (zip-slip, escaping link, special file)."""


class InsufficientSpaceError(ArchiveError):
    """Not enough free disk space for the uncompressed archive."""


@dataclass
class Member:
    name: str  # clean relative posix path
    kind: str  # file | dir | symlink | hardlink
    size: int
    link: str | None
    src: Any  # ZipInfo or TarInfo


def free_bytes(path: str | Path) -> int:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _clean_name(raw: str, archive: Path) -> str:
    name = raw.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UnsafeArchiveError(f"{archive}: member {raw!r} has an absolute path; refusing to extract")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {raw!r} contains '..' (zip-slip); refusing to extract")
    return "/".join(parts)


def _check_symlink(name: str, target: str, archive: Path) -> None:
    t = target.replace("\\", "/")
    if t.startswith("/") or re.match(r"^[A-Za-z]:", t):
        raise UnsafeArchiveError(f"{archive}: symlink {name!r} -> {target!r} is absolute; refusing to extract")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), t))
    if resolved == ".." or resolved.startswith("../"):
        raise UnsafeArchiveError(
            f"{archive}: symlink {name!r} -> {target!r} points outside the target; refusing to extract")


def archive_kind(archive: Path) -> str:
    if zipfile.is_zipfile(archive):
        return "zip"
    try:
        if tarfile.is_tarfile(archive):
            return "tar"
    except (OSError, EOFError, zlib.error):
        pass
    raise ArchiveError(f"{archive}: not a readable zip or tar archive (truncated or corrupt?)")


def list_members(archive: str | Path) -> tuple[str, list[Member]]:
    """Validate every member (raising UnsafeArchiveError) and return (kind, members)."""
    archive = Path(archive)
    kind = archive_kind(archive)
    members: list[Member] = []
    seen_files: set[str] = set()
    if kind == "zip":
        try:
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                links = {i.filename: zf.read(i).decode("utf-8", "replace") for i in infos
                         if stat.S_ISLNK(i.external_attr >> 16)}
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
            raise ArchiveError(f"{archive}: corrupt zip archive ({exc})") from None
        for info in infos:
            name = _clean_name(info.filename, archive)
            if not name:
                continue
            if info.flag_bits & 0x1:
                raise ArchiveError(f"{archive}: member {info.filename!r} is encrypted; extract it yourself "
                                   "and use source: dir")
            if info.compress_type not in _ZIP_METHODS:
                raise ArchiveError(
                    f"{archive}: member {info.filename!r} uses zip compression method {info.compress_type} "
                    "(e.g. Deflate64), which Python cannot read; extract it with 7z/unzip and use source: dir")
            if info.filename in links:
                _check_symlink(name, links[info.filename], archive)
                members.append(Member(name, "symlink", 0, links[info.filename], info))
            elif info.is_dir():
                members.append(Member(name, "dir", 0, None, info))
            else:
                members.append(Member(name, "file", info.file_size, None, info))
        return kind, members
    try:
        with tarfile.open(archive, "r:*") as tf:
            infos = tf.getmembers()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ArchiveError(f"{archive}: truncated or corrupt tar archive ({exc})") from None
    for info in infos:
        name = _clean_name(info.name, archive)
        if not name:
            continue
        if info.isdir():
            members.append(Member(name, "dir", 0, None, info))
        elif info.isreg():
            members.append(Member(name, "file", info.size, None, info))
            seen_files.add(name)
        elif info.issym():
            _check_symlink(name, info.linkname, archive)
            members.append(Member(name, "symlink", 0, info.linkname, info))
        elif info.islnk():
            try:
                target = _clean_name(info.linkname, archive)
            except UnsafeArchiveError:
                raise UnsafeArchiveError(f"{archive}: hard link {info.name!r} -> {info.linkname!r} points "
                                         "outside the target; refusing to extract") from None
            if target not in seen_files:
                raise UnsafeArchiveError(f"{archive}: hard link {info.name!r} -> {info.linkname!r} does not "
                                         "point to an earlier file of the archive; refusing to extract")
            members.append(Member(name, "hardlink", 0, target, info))
            seen_files.add(name)
        else:
            raise UnsafeArchiveError(f"{archive}: member {info.name!r} is a device or fifo; refusing to extract")
    return kind, members


def _copy(src, dst) -> None:
    shutil.copyfileobj(src, dst, 1 << 20)


def _inside(path: Path, root_real: str) -> bool:
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real + os.sep)


def _extract_into(archive: Path, kind: str, members: list[Member], dest: Path, progress: bool) -> None:
    root_real = os.path.realpath(dest)
    checked_dirs: set[Path] = set()
    total = sum(m.size for m in members)

    def prepare(path: Path) -> None:
        parent = path.parent
        if parent not in checked_dirs:
            parent.mkdir(parents=True, exist_ok=True)
            if not _inside(parent, root_real):
                raise UnsafeArchiveError(f"{archive}: {path.relative_to(dest)} would be written through a "
                                         "link outside the target; refusing to extract")
            checked_dirs.add(parent)
        if path.is_symlink():
            path.unlink()

    opener = zipfile.ZipFile(archive) if kind == "zip" else tarfile.open(archive, "r:*")
    with opener as arc, tqdm(total=total, unit="B", unit_scale=True, desc=f"extract {archive.name}",
                             disable=None if progress else True) as bar:
        for m in members:
            path = dest / m.name
            try:
                if m.kind == "dir":
                    path.mkdir(parents=True, exist_ok=True)
                    if not _inside(path, root_real):
                        raise UnsafeArchiveError(f"{archive}: directory {m.name!r} resolves outside the target")
                elif m.kind == "symlink":
                    prepare(path)
                    os.symlink(m.link, path)
                elif m.kind == "hardlink":
                    prepare(path)
                    shutil.copyfile(dest / m.link, path)
                else:
                    prepare(path)
                    src = arc.open(m.src) if kind == "zip" else arc.extractfile(m.src)
                    with src, open(path, "wb") as out:
                        _copy(src, out)
                    bar.update(m.size)
            except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
                raise ArchiveError(f"{archive}: member {m.name!r} is truncated or corrupt ({exc})") from None


def safe_extract(archive: str | Path, target: str | Path, *, marker: dict | None = None,
                 free_space: Callable[[Path], int] | None = None, progress: bool = True) -> Path:
    """Extract ``archive`` into the directory ``target`` (replacing it), safely and atomically.

    ``marker`` (if given) is written as ``target/.dmf_source.json``. ``free_space`` overrides
    :func:`free_bytes` (the module function is looked up at call time, so monkeypatching works).
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise FileNotFoundError(f"{archive}: archive not found")
    kind, members = list_members(archive)
    need = sum(m.size for m in members)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    avail = (free_space or free_bytes)(parent)
    required = int(need * SPACE_MARGIN) + SPACE_SLACK
    if required > avail:
        raise InsufficientSpaceError(
            f"{archive}: needs {_human(need)} uncompressed (+ margin: {_human(required)}), but only "
            f"{_human(avail)} are free on {parent}; free some space or extract elsewhere and use source: dir")
    for stale in parent.glob(f".{target.name}.extracting-*"):  # left by a killed earlier run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f".{target.name}.extracting-{os.getpid()}"
    tmp.mkdir()
    old = parent / f".{target.name}.old-{os.getpid()}"
    try:
        log.info("extracting %s (%d members, %s) into %s", archive, len(members), _human(need), target)
        _extract_into(archive, kind, members, tmp, progress)
        if marker is not None:
            (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            os.replace(old, target)  # put the previous dataset back
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target


def read_marker(target: str | Path) -> dict | None:
    try:
        return json.loads((Path(target) / MARKER).read_text())
    except (OSError, ValueError):
        return None
