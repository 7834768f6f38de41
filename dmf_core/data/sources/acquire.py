"""Get one dataset into ``data/raw/<name>`` from a URL, a local archive or an extracted folder.

``acquire`` is what ``download@<dataset>`` calls for every non-synthetic dataset:

- ``source: url``: the archive is downloaded (resumable) into ``data/archives/<file name>``;
  a complete archive already there is reused when its hash checks out.
- ``source: archive``: ``location`` is a local archive (e.g. ``data/archives/<expected name>``).
- ``source: dir``: ``location`` is an already extracted folder; it is hard-linked (or copied)
  into ``data/raw/<name>``, or used as is when it *is* ``data/raw/<name>``.

The archive's sha256 must equal, in this order, ``datasets.<name>.sha256`` from params, the
registry's known hash, or the hash recorded for ``<name>`` in the lock file by an earlier run.
Extraction is safe and atomic (:mod:`dmf_core.data.sources.extract`) and skipped when ``data/raw/<name>``
already holds the extraction of the very same archive. The hash goes into the lock file only
through :func:`record_verified`, which the download stage calls once the extracted dataset has
been parsed, matched its official statistics (where known) and been decoded: an incomplete
archive that fails its first run leaves no hash behind to refuse the complete one with.
"""

from __future__ import annotations

import logging
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

from dmf_core.data.sources.extract import read_marker, safe_extract
from dmf_core.data.sources.fetch import (
    ChecksumError,
    FetchError,
    cached_sha256,
    check_sha256,
    download,
    read_lock,
    update_lock,
    url_filename,
)
from dmf_core.data.sources.registry import REGISTRY, DatasetEntry

log = logging.getLogger(__name__)

_LOCK_KEYS = ("file", "sha256", "size", "source", "url")  # what a lock record says about the archive


def registry_entry(name: str, registry: str | None) -> DatasetEntry | None:
    """The entry named by ``registry`` (must exist) or, failing that, by the dataset name."""
    if registry is not None:
        if registry not in REGISTRY:
            raise ValueError(f"datasets.{name}.registry: {registry!r} unknown "
                             f"(known: {', '.join(sorted(REGISTRY))})")
        return REGISTRY[registry]
    return REGISTRY.get(name)


def layout_options(name: str, spec) -> dict:
    """Extra parse_layout() keywords for a dataset (variant, combine_all) from its registry entry."""
    entry = registry_entry(name, spec.registry)
    if entry is None or entry.layout != spec.layout:
        return {}
    return dict(entry.layout_options)


def expected_statistics(name: str, spec) -> dict:
    """The official per-split statistics of a dataset, or {} when it has no registry entry."""
    entry = registry_entry(name, spec.registry)
    return dict(entry.statistics) if entry is not None else {}


def _expected_hash(name: str, file_name: str, sha256: str | None, entry: DatasetEntry | None,
                   lock: dict | None, lock_file: Path) -> tuple[str | None, str]:
    if sha256:
        return sha256.lower(), f"datasets.{name}.sha256 in params"
    if entry is not None and entry.known_sha256(file_name):
        return entry.known_sha256(file_name), f"registry entry {entry.key}"
    if lock and lock.get("sha256"):
        return str(lock["sha256"]), recorded_origin(name, lock, lock_file)
    return None, ""


def recorded_origin(name: str, lock: dict, lock_file: Path) -> str:
    """Where a hash from the lock file came from, and how to forget it."""
    when = lock.get("recorded_at") or "an unknown time"
    by = lock.get("recorded_by") or "an earlier run"
    return (f"recorded for {name!r} in {lock_file} at {when} by {by}, from {lock.get('file', '?')} of "
            f"{lock.get('size', '?')} bytes; if you replaced the archive on purpose, forget that hash with "
            f"`dmf datasets --forget {name}` and run again")


def obtain_file(name: str, source: str, location: str, *, entry: DatasetEntry | None, sha256: str | None,
                lock_file: Path, cache_dir: Path, download_options: dict | None = None) -> tuple[Path, dict]:
    """A local copy of the archive/file checked against every hash known for it: (path, record).

    ``record`` (file, sha256, size, source, url) is what the lock file would hold; nothing is
    written to it here.
    """
    lock_file, cache_dir = Path(lock_file), Path(cache_dir)
    lock = read_lock(lock_file).get(name)
    prefix = entry.sha256_prefix if entry is not None else None
    if source == "url":
        if entry is not None and entry.withdrawn:
            raise FetchError(f"datasets.{name}: {entry.title} has been withdrawn and is not downloaded. "
                             f"{entry.how_to_get()}")
        file_name = url_filename(location) or (entry.default_archive() if entry else None) or f"{name}.archive"
        path = cache_dir / file_name
        expected, origin = _expected_hash(name, file_name, sha256, entry, lock, lock_file)
        digest = None
        if path.is_file():
            digest = cached_sha256(path)
            if expected is None or digest == expected:
                log.info("%s: reusing %s (sha256 %s)", name, path, digest)
            else:
                log.warning("%s: %s does not match the expected sha256 (%s); downloading again",
                            name, path, origin)
                path.unlink()
                digest = None
        if digest is None:
            try:
                digest = download(location, path, sha256=expected, sha256_prefix=prefix,
                                  **(download_options or {}))
            except ChecksumError as exc:
                raise ChecksumError(f"{exc} [{origin}]") from None
            except FetchError as exc:
                hint = f" {entry.how_to_get()}" if entry is not None else ""
                raise type(exc)(f"{exc}.{hint}") from None
    elif source == "archive":
        path = Path(location)
        if path.is_dir():
            raise ValueError(f"datasets.{name}.location: {path} is a folder; use source: dir for an "
                             "extracted dataset")
        if not path.is_file():
            hint = f" {entry.how_to_get()}" if entry is not None else ""
            raise FileNotFoundError(f"datasets.{name}.location: archive {path} not found.{hint}")
        expected, origin = _expected_hash(name, path.name, sha256, entry, lock, lock_file)
        digest = cached_sha256(path)
    else:
        raise ValueError(f"datasets.{name}.source: {source!r} cannot be fetched as a file (url|archive)")
    check_sha256(path, digest, expected, origin, prefix)
    record = {"file": path.name, "sha256": digest, "size": path.stat().st_size, "source": source}
    if source == "url":
        record["url"] = location
    return path, record


def record_verified(name: str, record: dict | None, lock_file: Path, recorded_by: str) -> dict | None:
    """Put ``record`` (from :func:`obtain_file` or the extraction marker) in the lock file; return it.

    A hash already recorded for the same bytes keeps its original time and run.
    """
    if not record or not record.get("sha256"):
        return None  # source: dir, nothing to record
    lock_file = Path(lock_file)
    old = read_lock(lock_file).get(name)
    if old and old.get("sha256") == record["sha256"]:
        return old
    fresh = {**{k: v for k, v in record.items() if k in _LOCK_KEYS},
             "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
             "recorded_by": recorded_by}
    log.info("%s: recording sha256 %s in %s", name, fresh["sha256"], lock_file)
    update_lock(lock_file, name, fresh)
    return fresh


def _link_tree(src: Path, dest: Path) -> int:
    """Hard-link (or copy) every file below ``src`` into ``dest``; symlinks are followed."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        dirnames.sort()
        rel = Path(dirpath).relative_to(src)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for fname in filenames:
            s, d = Path(dirpath) / fname, dest / rel / fname
            try:
                os.link(s, d, follow_symlinks=True)
            except OSError:
                shutil.copy2(s, d)
            n += 1
    return n


def _from_dir(name: str, location: str, raw_dir: Path) -> Path:
    src = Path(location)
    if not src.is_dir():
        raise FileNotFoundError(f"datasets.{name}.location: folder {src} not found (source: dir)")
    if raw_dir.exists() and src.resolve() == raw_dir.resolve():
        log.info("%s: using %s in place", name, raw_dir)
        return raw_dir
    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = raw_dir.with_name(f".{raw_dir.name}.linking-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        n = _link_tree(src, tmp)
        if raw_dir.is_symlink() or raw_dir.is_file():
            raw_dir.unlink()
        elif raw_dir.exists():
            shutil.rmtree(raw_dir)
        os.replace(tmp, raw_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s: linked %d files from %s into %s", name, n, src, raw_dir)
    return raw_dir


def acquire(name: str, spec, *, raw_dir: Path, lock_file: Path, cache_dir: Path,
            download_options: dict | None = None, free_space=None) -> Path:
    """Make ``raw_dir`` (data/raw/<name>) hold the verified, extracted dataset; return it.

    ``spec`` is a :class:`dmf_core.config.DatasetSpec` with source url|archive|dir.
    """
    raw_dir = Path(raw_dir)
    entry = registry_entry(name, spec.registry)
    if entry is not None and entry.kind != "dataset":
        raise ValueError(f"datasets.{name}.registry: {entry.key!r} is {entry.kind}, not a dataset")
    if spec.source == "synth":
        raise ValueError(f"datasets.{name}: source synth is generated, not acquired")
    if not spec.location:
        raise ValueError(f"datasets.{name}.location: source {spec.source!r} needs a location")
    if spec.source == "dir":
        return _from_dir(name, spec.location, raw_dir)
    archive, record = obtain_file(name, spec.source, spec.location, entry=entry, sha256=spec.sha256,
                                  lock_file=lock_file, cache_dir=cache_dir, download_options=download_options)
    marker = read_marker(raw_dir) if raw_dir.is_dir() else None
    if marker is not None and marker.get("sha256") == record["sha256"]:
        log.info("%s: %s already holds %s; not extracting again", name, raw_dir, archive.name)
        return raw_dir
    safe_extract(archive, raw_dir, marker=record, free_space=free_space)
    return raw_dir


def extracted_record(raw_dir: Path) -> dict | None:
    """The archive record of an extraction (its marker), or None (source: dir, or not extracted)."""
    marker = read_marker(raw_dir) if Path(raw_dir).is_dir() else None
    return marker if marker and marker.get("sha256") else None


def acquire_file(name: str, *, location: str | None = None, lock_file: Path, cache_dir: Path,
                 sha256: str | None = None, download_options: dict | None = None) -> Path:
    """A single verified file (e.g. pretrained weights, registry ``vit_base_jx``), downloaded if needed.

    ``location`` is a URL or a local path; by default the registry's first URL. Its hash checks
    (pin, registry prefix) are all there is to verify, so it is recorded in the lock file at once.
    """
    entry = REGISTRY.get(name)
    location = location or (entry.urls[0] if entry is not None and entry.urls else None)
    if not location:
        raise ValueError(f"{name}: no location given and no URL in the registry")
    source = "url" if location.startswith(("http://", "https://")) else "archive"
    path, record = obtain_file(name, source, location, entry=entry, sha256=sha256, lock_file=lock_file,
                               cache_dir=cache_dir, download_options=download_options)
    record_verified(name, record, lock_file, recorded_by=f"acquire_file({name!r})")
    return path
