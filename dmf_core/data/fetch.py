"""Getting bytes: resumable http(s) download, sha256 verification, and the checksum lock file.

``download`` streams to ``<dest>.part``; after a dropped connection or a timeout it retries with
exponential backoff and resumes with an HTTP Range request from the bytes it already has. The
file appears under its final name only once it is complete and (when a hash is known) verified.

The lock file (``data/checksums.json``) records, per dataset, the archive's name, size and
sha256, with sorted keys, so the next machine verifies the very same bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

USER_AGENT = "dmf-fetch/0.1 (+https://github.com/; research dataset download)"
CHUNK = 1 << 20


class FetchError(ValueError):
    """Getting or verifying a file failed; the message names the URL/file and what was expected."""


class DownloadError(FetchError):
    pass


class ChecksumError(FetchError):
    pass


class _Incomplete(Exception):
    """The connection ended before the announced number of bytes arrived."""


# ---------------------------------------------------------------------------------------------
# Hashing
# ---------------------------------------------------------------------------------------------


def sha256_file(path: str | Path, progress: bool = True) -> str:
    path = Path(path)
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}",
                                     disable=None if progress and size > 64 * CHUNK else True) as bar:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.sha256.json")


def cached_sha256(path: str | Path) -> str:
    """sha256 of ``path``, reusing a stamp next to it while size and mtime are unchanged.

    Re-runs over a multi-GB archive then cost one stat() instead of a full read.
    """
    path = Path(path)
    st = path.stat()
    stamp = _stamp_path(path)
    try:
        rec = json.loads(stamp.read_text())
        if rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
            return str(rec["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = sha256_file(path)
    with contextlib.suppress(OSError):  # a read-only archive folder only costs a re-hash next time
        stamp.write_text(json.dumps({"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    return digest


def check_sha256(path: Path, digest: str, expected: str | None, origin: str = "",
                 prefix: str | None = None) -> None:
    """Raise ChecksumError when ``digest`` differs from ``expected`` (or does not start with ``prefix``)."""
    if expected is not None and digest.lower() != expected.strip().lower():
        raise ChecksumError(f"{path}: sha256 is {digest}, expected {expected.lower()}"
                            f"{f' ({origin})' if origin else ''}; the file is corrupt or not the expected one")
    if prefix is not None and not digest.lower().startswith(prefix.lower()):
        raise ChecksumError(f"{path}: sha256 {digest} does not start with {prefix} (from the file name)")


# ---------------------------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------------------------


def url_filename(url: str) -> str | None:
    """The last path component of a URL, if it looks like a file name."""
    name = urllib.parse.unquote(urllib.parse.urlparse(url).path.rsplit("/", 1)[-1])
    return name if name and "." in name and name not in (".", "..") else None


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000)."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    start = None if span == "*" else int(span.split("-")[0])
    return start, (None if total in ("", "*") else int(total))


def download(url: str, dest: str | Path, *, sha256: str | None = None, sha256_prefix: str | None = None,
             timeout: float = 60.0, retries: int = 5, backoff: float = 2.0, max_backoff: float = 120.0,
             chunk_size: int = CHUNK, sleep: Callable[[float], None] = time.sleep,
             progress: bool = True, allow_html: bool = False) -> str:
    """Download ``url`` to ``dest`` (resuming ``dest.part``); return the file's sha256.

    Retries connection errors, timeouts, truncated transfers and HTTP 408/429/5xx up to
    ``retries`` times with exponential backoff (``backoff * 2**k`` s, capped), resuming with a
    Range request. Other HTTP errors (404, 403, ...) fail at once. A wrong hash deletes the
    partial file and raises ChecksumError.
    """
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise DownloadError(f"{url}: only http(s) URLs can be downloaded")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
                if resp.headers.get_content_type() == "text/html" and not allow_html:
                    raise DownloadError(
                        f"{url}: the server answered with an HTML page, not a file (a cloud-drive or "
                        "login page?); download it in a browser and use source: archive")
                if resp.status == 206:
                    start, total = _content_range(resp.headers.get("Content-Range"))
                    if start != have:
                        raise _Incomplete(f"server resumed at byte {start}, expected {have}")
                    mode = "ab"
                    log.info("%s: resuming at byte %d", url, have)
                else:
                    if have:
                        log.warning("%s: server ignored the Range request; starting over", url)
                    have, mode = 0, "wb"
                    length = resp.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                 desc=dest.name, disable=None if progress else True) as bar:
                    while chunk := resp.read(chunk_size):
                        f.write(chunk)
                        bar.update(len(chunk))
            size = part.stat().st_size
            if total is not None and size < total:
                raise _Incomplete(f"got {size} of {total} bytes")
            if total is not None and size > total:
                part.unlink()
                raise _Incomplete(f"got {size} bytes, more than the announced {total}; starting over")
            break
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:
                _, total = _content_range(exc.headers.get("Content-Range"))
                if total == have:  # the partial file is already complete
                    break
                part.unlink()
                error: str = f"HTTP 416 with {have} bytes on disk; starting over"
            elif exc.code in (408, 425, 429) or exc.code >= 500:
                error = f"HTTP {exc.code} {exc.reason}"
            else:
                raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (_Incomplete, urllib.error.URLError, http.client.HTTPException, ConnectionError,
                TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        attempt += 1
        if attempt > retries:
            kept = f"; {part.stat().st_size} bytes kept in {part}, re-run to resume" if part.exists() else ""
            raise DownloadError(f"{url}: giving up after {attempt} attempts ({error}){kept}")
        delay = min(max_backoff, backoff * 2 ** (attempt - 1))
        log.warning("%s: %s; retry %d/%d in %.1f s", url, error, attempt, retries, delay)
        sleep(delay)
    digest = sha256_file(part, progress=progress)
    try:
        check_sha256(dest, digest, sha256, "known hash", sha256_prefix)
    except ChecksumError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    st = dest.stat()
    with contextlib.suppress(OSError):
        _stamp_path(dest).write_text(json.dumps({"sha256": digest, "size": st.st_size,
                                                 "mtime_ns": st.st_mtime_ns}))
    log.info("%s: downloaded %d bytes to %s (sha256 %s)", url, st.st_size, dest, digest)
    return digest


# ---------------------------------------------------------------------------------------------
# Lock file
# ---------------------------------------------------------------------------------------------


def read_lock(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise FetchError(f"{path}: not valid JSON ({exc}); fix or delete it") from None
    if not isinstance(data, dict):
        raise FetchError(f"{path}: expected a JSON object of dataset -> record")
    return data


def update_lock(path: str | Path, key: str, record: dict) -> None:
    """Set ``key`` in the lock file (sorted keys, atomic replace, flock against concurrent stages)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        data = read_lock(path)
        if data.get(key) == record:
            return
        data[key] = record
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
