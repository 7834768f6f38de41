"""Getting bytes: resumable http(s) download, sha256 verification, and the checksum lock file.

``download`` streams to ``<dest>.part``; after a dropped connection or a timeout it retries with
exponential backoff and resumes with an HTTP Range request from the bytes it already has. The
file appears under its final name only once it is complete and (when a hash is known) verified.

Resuming never joins two versions of a file: the partial is tied to the first response's strong
ETag (or Last-Modified) in a sidecar ``.<dest>.part.json``; a resume sends it as ``If-Range`` and
starts over when the server's file changed (a 200, or a 206 with another validator). A partial
without a matching sidecar, or from a server that gives no validator, is not resumed.

Plain ``http://`` (asked for, or reached by a redirect) is refused unless a full sha256 is
pinned: nothing else would stop altered bytes from being recorded as the truth.

The lock file (``data/checksums.json``) records, per dataset, the archive's name, size and
sha256 (and when and by which run it was recorded), with sorted keys, so the next machine
verifies the very same bytes. ``forget_lock`` drops an entry (``dmf datasets --forget <name>``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import logging
import os
import re
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
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


class InsecureURLError(DownloadError):
    """A plain-http URL (asked for, or redirected to) without a pinned sha256."""


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
                            f"{f' ({origin})' if origin else ''}: these are not the bytes that hash was taken from")
    if prefix is not None and not digest.lower().startswith(prefix.lower()):
        raise ChecksumError(f"{path}: sha256 {digest} does not start with {prefix} (from the file name)")


# ---------------------------------------------------------------------------------------------
# Download: which URLs may be fetched
# ---------------------------------------------------------------------------------------------


def url_filename(url: str) -> str | None:
    """The last path component of a URL, if it looks like a file name."""
    name = urllib.parse.unquote(urllib.parse.urlparse(url).path.rsplit("/", 1)[-1])
    return name if name and "." in name and name not in (".", "..") else None


def is_pinned(sha256: str | None) -> bool:
    """True for a full 64-hex-digit sha256.

    Only a full hash known *before* the transfer makes plain http safe: the bytes are checked
    against it, so whoever can alter them in transit cannot get them accepted. A file-name prefix
    (8 hex digits) is far too short to count.
    """
    return bool(sha256) and re.fullmatch(r"[0-9a-fA-F]{64}", sha256.strip()) is not None


def check_scheme(url: str, pinned: bool, redirected_from: str | None = None) -> None:
    """Refuse ``url`` unless it is https, or http with a pinned sha256.

    Without TLS and without a pinned hash, the first-use hash in data/checksums.json would
    faithfully record whatever a man in the middle served. Called for the URL asked for and for
    every redirect hop, so an https link cannot be downgraded to http on the way.
    """
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme == "https" or (scheme == "http" and pinned):
        return
    where = f"{redirected_from} redirects to {url}" if redirected_from else url
    if scheme != "http":
        raise DownloadError(f"{where}: only http(s) URLs can be downloaded")
    raise InsecureURLError(
        f"{where}: refusing a plain http:// download without a pinned sha256 (its bytes could be "
        "altered in transit and would then be recorded as the truth); use an https:// URL, or pin "
        "the file's sha256 (datasets.<name>.sha256 in params.yaml, or download(..., sha256=...))")


class CheckedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """urllib's redirect handling, with :func:`check_scheme` applied to every hop."""

    def __init__(self, pinned: bool) -> None:
        super().__init__()
        self.pinned = pinned

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        try:
            check_scheme(newurl, self.pinned, redirected_from=req.full_url)
        except DownloadError:
            if fp is not None:
                fp.close()
            raise
        return super().redirect_request(req, fp, code, msg, headers, newurl)


# ---------------------------------------------------------------------------------------------
# Download: the partial file and the validator it is tied to
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Validator:
    """What identifies one version of the server's file: a response header and its value."""

    header: str  # "ETag" or "Last-Modified"
    value: str


class _Changed(Exception):
    """A resumed response belongs to another version of the file than the bytes on disk."""


def response_validator(headers) -> Validator | None:
    """The strong ETag of a response, else its Last-Modified, else None.

    This is what a resume sends as If-Range and what a 206 must repeat. A weak ETag (``W/"..."``)
    only promises equivalent content, not identical bytes, and may not be used in If-Range
    (RFC 9110 13.1.5), so it is skipped.
    """
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return Validator("ETag", etag)
    modified = headers.get("Last-Modified")
    return Validator("Last-Modified", modified) if modified else None


def _meta_path(part: Path) -> Path:
    return part.with_name(f".{part.name}.json")


def _write_meta(path: Path, record: dict) -> None:
    """Atomically replace ``path`` with ``record`` as JSON; a symlink there is replaced, not followed."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_meta(path: Path) -> dict | None:
    """The sidecar's record; None when it is missing, a symlink, unreadable or not a JSON object."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        with os.fdopen(fd, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _discard(part: Path, meta: Path) -> None:
    """Remove the partial file and its record (unlink never follows a symlink)."""
    part.unlink(missing_ok=True)
    meta.unlink(missing_ok=True)


def _start_fresh(url: str, part: Path, meta: Path, validator: Validator | None, total: int | None) -> None:
    """Empty the partial and tie it to the validator of the response about to be written.

    The order (remove both, write the record, create the empty part) means that a kill at any
    point leaves either no part or an empty one, never old bytes under a new record.
    """
    _discard(part, meta)
    record = {"url": url, "total": total,
              "validator": [validator.header, validator.value] if validator else None}
    _write_meta(meta, record)
    os.close(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644))


def _resume_point(url: str, part: Path, meta: Path) -> tuple[int, Validator | None, int | None]:
    """(bytes on disk that may be resumed, the validator they were fetched under, the file's size).

    A partial is resumed only if its sidecar says it came from this URL under a validator. Any
    other partial (no sidecar: an older version of this code; another URL; a server that gave no
    validator; a symlink) is deleted, because its bytes cannot be shown to belong to the file the
    server has now, and joining two versions gives a file that never existed.
    """
    try:
        st = os.lstat(part)
    except FileNotFoundError:
        return 0, None, None
    record = _read_meta(meta)
    reason = None
    if not stat.S_ISREG(st.st_mode):
        reason = "is not a regular file"
    elif st.st_size == 0:
        reason = ""
    elif record is None:
        reason = f"has no readable record {meta.name} of where it came from (left by an older version?)"
    elif record.get("url") != url:
        reason = f"came from another URL ({record.get('url')})"
    elif not record.get("validator"):
        reason = ("came from a server that sent no ETag or Last-Modified, so there is no telling "
                  "whether its file changed since")
    else:
        try:
            validator = Validator(*map(str, record["validator"]))
            total = record.get("total")
            total = int(total) if total is not None else None
        except (TypeError, ValueError):
            validator, total, reason = None, None, f"has an unreadable record {meta.name}"
        if reason is None and total is not None and st.st_size > total:
            reason = f"is larger than the {total} bytes the server announced"
    if reason is not None:
        if reason:
            log.warning("%s: not resuming: %s %s; starting over", url, part, reason)
        _discard(part, meta)
        return 0, None, None
    return st.st_size, validator, total


def _same_file(headers, validator: Validator, known_total: int | None, total: int | None) -> bool:
    """Does a 206/416 answer describe the very version the partial came from?

    It must repeat the recorded validator (a missing one is not taken on trust) and, where both
    are known, announce the same total size.
    """
    if headers.get(validator.header) != validator.value:
        return False
    return known_total is None or total is None or known_total == total


# ---------------------------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------------------------


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000)."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    start = None if span == "*" else int(span.split("-")[0])
    return start, (None if total in ("", "*") else int(total))


def _request_headers(have: int, validator: Validator | None) -> dict[str, str]:
    """Plain GET, or a Range request that the server must only honour for the same version (If-Range)."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if have and validator is not None:
        headers["Range"] = f"bytes={have}-"
        headers["If-Range"] = validator.value
    return headers


def _place_body(resp, url: str, part: Path, meta: Path, have: int, validator: Validator | None,
                known_total: int | None) -> tuple[int, int | None]:
    """Decide where the response body goes; return (offset in the part, the file's total size).

    A 206 for the same version continues the part. A 200 (the server's file changed, so If-Range
    failed, or the server ignores Range) restarts it, tied to the new validator. A 206 for another
    version raises _Changed.
    """
    if resp.status == 206:
        start, total = _content_range(resp.headers.get("Content-Range"))
        if have and not _same_file(resp.headers, validator, known_total, total):
            raise _Changed(f"the server's file changed since the partial download ({validator.header} "
                           f"{validator.value} -> {resp.headers.get(validator.header)}, total {known_total} "
                           f"-> {total})")
        if start != have:
            raise _Incomplete(f"server resumed at byte {start}, expected {have}")
        if have:
            log.info("%s: resuming at byte %d", url, have)
            return have, total
    else:
        if have:
            log.warning("%s: the server sent the whole file instead of the rest (its file changed since "
                        "the partial download, or it ignores Range); starting over", url)
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
    _start_fresh(url, part, meta, response_validator(resp.headers), total)
    return 0, total


def _receive(resp, part: Path, offset: int, total: int | None, desc: str, chunk_size: int,
             progress: bool) -> None:
    """Append the body to the part (emptied by _start_fresh when offset is 0), not following a symlink."""
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "ab") as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=desc,
                                        disable=None if progress else True) as bar:
        while chunk := resp.read(chunk_size):
            f.write(chunk)
            bar.update(len(chunk))


def download(url: str, dest: str | Path, *, sha256: str | None = None, sha256_prefix: str | None = None,
             timeout: float = 60.0, retries: int = 5, backoff: float = 2.0, max_backoff: float = 120.0,
             chunk_size: int = CHUNK, sleep: Callable[[float], None] = time.sleep,
             progress: bool = True, allow_html: bool = False) -> str:
    """Download ``url`` to ``dest`` (resuming ``dest.part``); return the file's sha256.

    Retries connection errors, timeouts, truncated transfers and HTTP 408/429/5xx up to
    ``retries`` times with exponential backoff (``backoff * 2**k`` s, capped), resuming with a
    Range request guarded by If-Range, so that bytes of two versions of the file are never
    joined. Other HTTP errors (404, 403, ...) fail at once. A wrong hash deletes the partial file
    and raises ChecksumError. Plain http (also via a redirect) needs a pinned ``sha256``.
    """
    pinned = is_pinned(sha256)
    check_scheme(url, pinned)
    opener = urllib.request.build_opener(CheckedRedirectHandler(pinned))
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    meta = _meta_path(part)
    attempt = 0
    while True:
        have, validator, known_total = _resume_point(url, part, meta)
        request = urllib.request.Request(url, headers=_request_headers(have, validator))
        try:
            with opener.open(request, timeout=timeout) as resp:
                if resp.headers.get_content_type() == "text/html" and not allow_html:
                    raise DownloadError(
                        f"{url}: the server answered with an HTML page, not a file (a cloud-drive or "
                        "login page?); download it in a browser and use source: archive")
                offset, total = _place_body(resp, url, part, meta, have, validator, known_total)
                _receive(resp, part, offset, total, dest.name, chunk_size, progress)
            size = part.stat().st_size
            if total is not None and size < total:
                raise _Incomplete(f"got {size} of {total} bytes")
            if total is not None and size > total:
                _discard(part, meta)
                raise _Incomplete(f"got {size} bytes, more than the announced {total}; starting over")
            break
        except _Changed as exc:  # not a failure of the server: start over at once
            log.warning("%s: %s; starting over", url, exc)
            _discard(part, meta)
            continue
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:
                _, total = _content_range(exc.headers.get("Content-Range"))
                if total == have and _same_file(exc.headers, validator, known_total, total):
                    break  # the partial file is already complete
                _discard(part, meta)
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
            raise DownloadError(f"{url}: giving up after {attempt} attempts ({error}){_kept(part, meta)}")
        delay = min(max_backoff, backoff * 2 ** (attempt - 1))
        log.warning("%s: %s; retry %d/%d in %.1f s", url, error, attempt, retries, delay)
        sleep(delay)
    digest = sha256_file(part, progress=progress)
    try:
        check_sha256(dest, digest, sha256, "known hash", sha256_prefix)
    except ChecksumError:
        _discard(part, meta)
        raise
    os.replace(part, dest)
    meta.unlink(missing_ok=True)
    st = dest.stat()
    with contextlib.suppress(OSError):
        _stamp_path(dest).write_text(json.dumps({"sha256": digest, "size": st.st_size,
                                                 "mtime_ns": st.st_mtime_ns}))
    log.info("%s: downloaded %d bytes to %s (sha256 %s)", url, st.st_size, dest, digest)
    return digest


def _kept(part: Path, meta: Path) -> str:
    """The end of the giving-up message: what is left on disk and whether a re-run can resume it."""
    if not part.exists():
        return ""
    record = _read_meta(meta) or {}
    then = ("re-run to resume" if record.get("validator") else
            "a re-run starts over (the server sends no ETag or Last-Modified to resume against)")
    return f"; {part.stat().st_size} bytes kept in {part}, {then}"


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
        _write_lock(path, data)


def _write_lock(path: Path, data: dict) -> None:
    """Atomic replace with sorted keys; the caller holds the flock."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def forget_lock(path: str | Path, key: str) -> dict | None:
    """Remove ``key`` from the lock file; return the record it had (None when there was none)."""
    path = Path(path)
    if not path.exists():
        return None
    with open(path.with_name(f".{path.name}.lock"), "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        data = read_lock(path)
        record = data.pop(key, None)
        if record is not None:
            _write_lock(path, data)
    return record
