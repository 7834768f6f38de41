"""Safe extraction of zip and tar(.gz/.bz2/.xz) archives.

Extraction can never write outside the target, whatever the archive. Two lines of defence:

1. :func:`list_members` checks every member as *text* before anything is written: absolute
   paths, ``..`` components, absolute or obviously escaping link targets, hard links to anything
   but an earlier regular file, device/fifo members, oversized zip "symlinks". This refuses the
   common attacks with nothing on disk at all.
2. Text cannot see what earlier links make of a later path (``a/b -> ..`` then
   ``a/b/c -> ../..`` both *look* inside, yet ``c`` lands at the root pointing two levels up).
   So :class:`_Tree` checks every member again at the moment it is created, against the folder as
   it is on disk then (extraction is sequential: earlier links are already there). Paths are
   resolved one component at a time, following each link with ``lstat``/``readlink`` and never
   stepping above the extraction root; a member whose parent leads outside, a member written
   *through* an existing symlink, a symlink whose target (seen from its real parent) leads outside,
   and a hard link to anything but the regular file an earlier member wrote are refused. Every tar
   (and, as TarInfo, zip) member also gets the stdlib PEP 706 ``data`` filter as a second opinion
   on the same state; it is not relied on alone, since 3.11.7's filter trusts ``os.path.realpath``,
   which gives up silently on over-long or looping paths (CVE-2025-4517). Before the folder is
   renamed into place every symlink is resolved once more, since a link that was dangling when it
   was made may have been given an escaping meaning by a later member.

Everything we write ourselves (members, hard-link copies, the ``.dmf_source.json`` marker) is
created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` after removing what was there, so no write ever
follows a link. Zip symlink entries (mode ``S_IFLNK`` in ``external_attr``) are created as real
symlinks under the same rules; zipfile itself would write them as regular files holding the link
text, which would silently corrupt a dataset that uses them.

The uncompressed size (hard links count as the copies they become) is compared with the free
space first (:mod:`dmf_core.data.disk`). The archive
is extracted into a temporary folder next to the target and renamed into place, so an interrupted
or refused extraction never leaves a half dataset under the final name.
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
from typing import IO, Any, NoReturn

from tqdm import tqdm

from dmf_core.data import disk
from dmf_core.data.disk import InsufficientSpaceError

log = logging.getLogger(__name__)

MARKER = ".dmf_source.json"  # written into an extracted dataset: which archive it came from
SPACE_MARGIN = 1.02  # need uncompressed size x margin + SPACE_SLACK bytes free
SPACE_SLACK = 16 << 20
_ZIP_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA})
MAX_LINK_HOPS = 40  # symlinks followed in one lookup, as Linux does before ELOOP
MAX_LINK_TEXT = 4096  # PATH_MAX: a zip "symlink" entry longer than this is not a link
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class ArchiveError(ValueError):
    """Not a readable archive (truncated, corrupt, unknown format)."""


class UnsafeArchiveError(ArchiveError):
    """A member that would write outside the target (zip-slip, escaping link, special file)."""


@dataclass
class Member:
    """One archive member after the text checks, in archive order."""

    name: str  # clean relative posix path
    kind: str  # file | dir | symlink | hardlink
    size: int  # bytes it will take on disk (a hard link is extracted as a copy)
    link: str | None  # symlink: target as stored; hard link: clean name of the earlier member
    src: Any  # ZipInfo or TarInfo


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
    """Text-only check (before writing): absolute targets, and ``..`` that climbs out on its own."""
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


def _zip_link_texts(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], archive: Path) -> dict[str, str]:
    """Targets of the zip's symlink entries; refuses one too long to be a path (no read into memory)."""
    links = {}
    for info in infos:
        if stat.S_ISLNK(info.external_attr >> 16):
            if info.flag_bits & 0x1 or info.compress_type not in _ZIP_METHODS:
                links[info.filename] = ""  # unreadable: list_members refuses it with the reason
            elif info.file_size > MAX_LINK_TEXT:
                raise UnsafeArchiveError(f"{archive}: symlink {info.filename!r} has a {info.file_size}-byte "
                                         "target, longer than any path; refusing to extract")
            else:
                links[info.filename] = zf.read(info).decode("utf-8", "replace")
    return links


def list_members(archive: str | Path) -> tuple[str, list[Member]]:
    """Validate every member as text (raising UnsafeArchiveError) and return (kind, members)."""
    archive = Path(archive)
    kind = archive_kind(archive)
    members: list[Member] = []
    file_sizes: dict[str, int] = {}  # regular files so far, by name (hard-link sources)
    if kind == "zip":
        try:
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                links = _zip_link_texts(zf, infos, archive)
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
            file_sizes.pop(name, None)
        elif info.isreg():
            members.append(Member(name, "file", info.size, None, info))
            file_sizes[name] = info.size
        elif info.issym():
            _check_symlink(name, info.linkname, archive)
            members.append(Member(name, "symlink", 0, info.linkname, info))
            file_sizes.pop(name, None)
        elif info.islnk():
            try:
                target = _clean_name(info.linkname, archive)
            except UnsafeArchiveError:
                raise UnsafeArchiveError(f"{archive}: hard link {info.name!r} -> {info.linkname!r} points "
                                         "outside the target; refusing to extract") from None
            if target not in file_sizes:
                raise UnsafeArchiveError(f"{archive}: hard link {info.name!r} -> {info.linkname!r} does not "
                                         "point to an earlier file of the archive; refusing to extract")
            members.append(Member(name, "hardlink", file_sizes[target], target, info))
            file_sizes[name] = file_sizes[target]
        else:
            raise UnsafeArchiveError(f"{archive}: member {info.name!r} is a device or fifo; refusing to extract")
    return kind, members


def _copy(src, dst) -> None:
    shutil.copyfileobj(src, dst, 1 << 20)


def _create_new(path: str | Path) -> IO[bytes]:
    """Open ``path`` as a brand-new regular file, never through a link.

    Whatever is there (an earlier duplicate member, a symlink an archive put at the marker's path)
    is removed, then the file is created with O_EXCL | O_NOFOLLOW: the open fails rather than
    follow a link or write into another name of an existing inode.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return os.fdopen(os.open(path, _NEW_FILE, 0o666), "wb")


def _write_marker(folder: Path, marker: dict) -> None:
    """Write ``folder/.dmf_source.json`` as a regular file of ours, replacing any link at that path."""
    with _create_new(folder / MARKER) as out:
        out.write((json.dumps(marker, indent=2, sort_keys=True) + "\n").encode())


class _Tree:
    """The extraction folder as it is on disk right now; every member is created through it.

    The checks run at the moment a member is created, against what earlier members (links
    included) have already made of the folder, so no sequence of individually harmless-looking
    links can steer a later write outside.
    """

    def __init__(self, archive: Path, root: Path):
        self.archive = archive
        self.root = os.path.realpath(root, strict=True)
        self.files: dict[str, str] = {}  # member name -> real path of the regular file it wrote
        self.links: list[tuple[Member, str]] = []  # every symlink made, with its real path

    def refuse(self, what: str) -> NoReturn:
        raise UnsafeArchiveError(f"{self.archive}: {what}; refusing to extract")

    def lstat_mode(self, path: str, what: str) -> int | None:
        """``st_mode`` of ``path`` itself (None: not there yet); refuses what cannot be checked.

        ENAMETOOLONG, ELOOP, EACCES... mean we cannot know where a write would land, so the member
        is refused instead of guessed at (the guess is how realpath-based checks are bypassed).
        """
        try:
            return os.lstat(path).st_mode
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.refuse(f"{what}: cannot check {os.path.relpath(path, self.root)!r} ({exc.strerror})")

    def resolve(self, start: str, rel: str, what: str) -> str:
        """Real path of ``rel`` looked up from the real folder ``start``, the way the kernel would.

        One component at a time: a symlink is replaced by its target (absolute targets and more
        than MAX_LINK_HOPS links are refused), ``..`` goes to the real parent, and any step above
        the root is refused at once, so nothing outside the root is ever consulted. Components not
        there yet are kept as names (we create them later, as plain folders). ``os.path.realpath``
        is not used: it stops resolving silently on over-long or looping paths.
        """
        todo = rel.split("/")[::-1]
        current, hops = start, 0
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if current == self.root:
                    self.refuse(f"{what} leads outside the target")
                current = os.path.dirname(current)
                continue
            step = os.path.join(current, part)
            mode = self.lstat_mode(step, what)
            if mode is None or not stat.S_ISLNK(mode):
                current = step
                continue
            hops += 1
            target = os.readlink(step)
            if hops > MAX_LINK_HOPS or target.startswith("/"):
                self.refuse(f"{what} goes through {os.path.relpath(step, self.root)!r} -> {target!r}, "
                            "an absolute or looping link")
            todo.extend(target.split("/")[::-1])
        return current

    def place(self, m: Member) -> str:
        """Create ``m``'s parent folders and return its real destination, which is not a symlink.

        Parents may go through links that stay inside (a dataset may use them); the destination
        itself being a link is refused, since writing there would write wherever it points.
        """
        parent_rel, base = posixpath.split(m.name)
        parent = self.resolve(self.root, parent_rel, f"member {m.name!r}")
        os.makedirs(parent, exist_ok=True)
        dest = os.path.join(parent, base)
        mode = self.lstat_mode(dest, f"member {m.name!r}")
        if mode is not None and stat.S_ISLNK(mode):
            self.refuse(f"member {m.name!r} would be written through the symlink "
                        f"{os.path.relpath(dest, self.root)!r} -> {os.readlink(dest)!r}")
        return dest

    def second_opinion(self, m: Member) -> None:
        """The stdlib PEP 706 'data' filter on the same member and on-disk state (defence in depth)."""
        src = m.src
        if isinstance(src, tarfile.TarInfo):
            info = src.replace(name=m.name, linkname=m.link if m.link is not None else src.linkname, deep=False)
        else:  # a zip member, described as the tar member it amounts to
            info = tarfile.TarInfo(m.name)
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE}.get(m.kind, tarfile.REGTYPE)
            info.linkname, info.mode = m.link or "", 0o644
        try:
            tarfile.data_filter(info, self.root)
        except tarfile.FilterError as exc:
            self.refuse(f"member {m.name!r} refused by tarfile's data filter ({exc})")

    def make_dir(self, m: Member) -> None:
        dest = self.place(m)
        self.second_opinion(m)
        os.makedirs(dest, exist_ok=True)
        self.files.pop(m.name, None)

    def make_file(self, m: Member, open_src: Callable[[], IO[bytes]]) -> None:
        dest = self.place(m)
        self.second_opinion(m)
        with open_src() as src, _create_new(dest) as out:
            _copy(src, out)
        self.files[m.name] = dest

    def make_symlink(self, m: Member) -> None:
        """A symlink whose target, looked up from the link's real folder, stays inside."""
        assert m.link is not None
        dest = self.place(m)
        if m.link.startswith("/"):
            self.refuse(f"symlink {m.name!r} -> {m.link!r} is absolute")
        self.resolve(os.path.dirname(dest), m.link, f"symlink {m.name!r} -> {m.link!r}")
        self.second_opinion(m)
        try:
            os.unlink(dest)  # a duplicate member: the later one wins, as with tar
        except FileNotFoundError:
            pass
        os.symlink(m.link, dest)
        self.files.pop(m.name, None)
        self.links.append((m, dest))

    def make_hardlink(self, m: Member) -> None:
        """A copy of the regular file an earlier member wrote, if that file is still what the name means.

        The name must be an earlier regular member's, must still resolve (through whatever links
        now exist) to the very file that member wrote, and that file must not have become a link.
        """
        assert m.link is not None
        what = f"hard link {m.name!r} -> {m.link!r}"
        wrote = self.files.get(m.link)
        if wrote is None:
            self.refuse(f"{what} does not point to an earlier regular file of the archive")
        now = self.resolve(self.root, m.link, what)
        if now != wrote or not os.path.isfile(now) or os.path.islink(now):
            self.refuse(f"{what}: {m.link!r} is no longer the regular file extracted there")
        dest = self.place(m)
        self.second_opinion(m)
        with os.fdopen(os.open(wrote, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as src, \
                _create_new(dest) as out:
            _copy(src, out)
        self.files[m.name] = dest

    def check_links(self) -> None:
        """Resolve every symlink again on the finished tree.

        A link that was dangling when made (``b -> d/..`` before ``d`` exists) can be turned into an
        escaping one by a later member (``d -> .``); such a link must not reach the final dataset.
        """
        for m, dest in self.links:
            if os.path.islink(dest):
                self.resolve(os.path.dirname(dest), os.readlink(dest), f"symlink {m.name!r} -> {m.link!r}")


def _extract_into(archive: Path, kind: str, members: list[Member], dest: Path, progress: bool) -> None:
    tree = _Tree(archive, dest)
    total = sum(m.size for m in members)
    opener = zipfile.ZipFile(archive) if kind == "zip" else tarfile.open(archive, "r:*")
    with opener as arc, tqdm(total=total, unit="B", unit_scale=True, desc=f"extract {archive.name}",
                             disable=None if progress else True) as bar:
        for m in members:
            try:
                if m.kind == "dir":
                    tree.make_dir(m)
                elif m.kind == "symlink":
                    tree.make_symlink(m)
                elif m.kind == "hardlink":
                    tree.make_hardlink(m)
                else:
                    tree.make_file(m, lambda m=m: arc.open(m.src) if kind == "zip" else arc.extractfile(m.src))
                bar.update(m.size)
            except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
                raise ArchiveError(f"{archive}: member {m.name!r} is truncated or corrupt ({exc})") from None
        tree.check_links()


def safe_extract(archive: str | Path, target: str | Path, *, marker: dict | None = None,
                 free_space: Callable[[Path], int] | None = None, progress: bool = True) -> Path:
    """Extract ``archive`` into the directory ``target`` (replacing it), safely and atomically.

    ``marker`` (if given) is written as ``target/.dmf_source.json``. ``free_space`` overrides
    :func:`dmf_core.data.disk.free_bytes`.
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise FileNotFoundError(f"{archive}: archive not found")
    kind, members = list_members(archive)
    need = sum(m.size for m in members)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    avail = (free_space or disk.free_bytes)(parent)
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
            _write_marker(tmp, marker)
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
    """The marker of an extracted dataset, or None (missing, unreadable, or a symlink: never ours)."""
    try:
        with os.fdopen(os.open(Path(target) / MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)) as fh:
            return json.loads(fh.read())
    except (OSError, ValueError):
        return None
