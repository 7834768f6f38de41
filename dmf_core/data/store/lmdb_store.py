"""Pack one (dataset, split) of a manifest into a single-file LMDB, and read it back.

Layout of a packed split (``data/lmdb/<dataset>/<dataset>-<split>.lmdb``):

- the LMDB (``subdir=False``): keys ``b"00000000"``, ``b"00000001"``, ... (8-digit, zero-padded row
  index, so byte order is row order); values are the encoded image bytes (the original file bytes,
  or a JPEG re-encoded at ``resize`` when that is set), never pickles; one extra key
  :data:`META_KEY` holds a JSON object (format, count, the params fingerprint, digests of the
  source rows, of the index and of the captions).
- the sidecar ``<same name>.parquet``, one row per key in key order: ``key, image_id, pid, label,
  camid, sha1, height, width`` (+ ``caption_start, caption_count`` when captions are given). Its
  schema metadata records the LMDB file size, so a truncated LMDB is caught before any page is read.
- ``<same name>.corrupt.json`` only when images were skipped (``on_corrupt="skip"``).

Determinism: rows sorted by ``image_id``, keys appended in order, a fixed map size and commit
batch, ``meminit=True``, no lock file (``lock=False``, the writer is the only user of the temporary
file), so the same input and params give a byte-identical file.

Atomicity: everything is written under ``<name>.partial`` names, fsynced, then renamed (sidecar
first, LMDB last). A run killed halfway leaves only ``.partial`` files, which the next run deletes
before starting clean; a reader never sees a final name whose content is incomplete.

This module does not import torch (packing starts fast); :mod:`dmf_core.data.loading.loader` builds the
torch side on :class:`LmdbReader`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from dmf_core.data import disk
from dmf_core.data.images import decode_rgb

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_KEY = b"__meta__"
KEY_WIDTH = 8
MAP_SIZE = 1 << 40  # 1 TiB of address space: fixed (it is stored in the file), sparse on disk
COMMIT_EVERY = 1024  # entries per write transaction: fixed, part of the byte-identical contract
JPEG_QUALITY = 95  # re-encoding quality when pack.resize is set
SIDECAR_SIZE_KEY = b"dmf.lmdb_bytes"
PARTIAL = ".partial"

SIDECAR_COLUMNS = ["key", "image_id", "pid", "label", "camid", "sha1", "height", "width"]


def key_of(index: int) -> bytes:
    return b"%08d" % index


def sidecar_path(path: Path) -> Path:
    return Path(path).with_suffix(".parquet")


def corrupt_report_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".corrupt.json")


def partial_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + PARTIAL)


def frame_digest(frame: pd.DataFrame) -> str:
    """sha1 over the text of ``frame``'s values, column by column (order matters). Plain text, so
    the digest (stored in the LMDB) does not depend on pandas' hashing or dtypes."""
    h = hashlib.sha1()
    for name in frame.columns:
        h.update(f"\x1e{name}\x1d".encode())
        h.update("\x1f".join(map(str, frame[name].tolist())).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


@dataclass
class PackReport:
    count: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    path: Path | None = None

    @property
    def images_per_s(self) -> float:
        return (self.count + len(self.skipped)) / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def _load_one(image_root: Path, image_id: str, resize: list[int] | None):
    """Read, verify (full decode) and optionally re-encode one image.

    Returns ``(bytes, height, width, None)`` or ``(None, 0, 0, reason)``.
    """
    path = image_root / image_id
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, 0, 0, f"unreadable: {exc.__class__.__name__}: {exc.strerror or exc}"
    if not data:
        return None, 0, 0, "empty file"
    try:
        im = decode_rgb(data, image_id)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on bad data
        return None, 0, 0, f"does not decode: {exc.__class__.__name__}: {exc}"
    if resize is not None:
        height, width = int(resize[0]), int(resize[1])
        if im.size != (width, height):
            im = im.resize((width, height), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=JPEG_QUALITY)
        return buf.getvalue(), height, width, None
    return data, im.height, im.width, None


def caption_refs(image_ids, caption_image_ids) -> tuple[np.ndarray, np.ndarray]:
    """Start row and count of each image's captions among ``caption_image_ids`` (the image_id
    column of captions sorted by image_id, caption_idx)."""
    ids = np.asarray(caption_image_ids)
    query = np.asarray(image_ids)
    start = np.searchsorted(ids, query, side="left")
    stop = np.searchsorted(ids, query, side="right")
    return start.astype(np.int64), (stop - start).astype(np.int64)


def _sorted_captions(captions: pd.DataFrame) -> pd.DataFrame:
    missing = {"image_id", "caption_idx", "caption"} - set(captions.columns)
    if missing:
        raise ValueError(f"captions: missing columns {sorted(missing)} (have {list(captions.columns)})")
    return captions.sort_values(["image_id", "caption_idx"], kind="mergesort").reset_index(drop=True)


def captions_digest(captions: pd.DataFrame) -> str:
    return frame_digest(_sorted_captions(captions)[["image_id", "caption_idx", "caption"]])


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    try:
        Path(path).unlink()
    except FileNotFoundError:
        pass


def _write_sidecar(frame: pd.DataFrame, path: Path, lmdb_bytes: int) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[SIDECAR_SIZE_KEY] = str(lmdb_bytes).encode()
    table = table.replace_schema_metadata(meta)
    pq.write_table(table, path, compression="zstd")


def pack_split(
    rows: pd.DataFrame,
    image_root: Path,
    out_path: Path,
    *,
    resize: list[int] | None = None,
    on_corrupt: str = "fail",
    captions: pd.DataFrame | None = None,
    relabel: bool = False,
    params_fingerprint: dict | None = None,
    threads: int | None = None,
) -> PackReport:
    """Pack the manifest ``rows`` of one (dataset, split) into ``out_path`` (+ sidecar).

    ``rows`` need ``image_id, pid, camid``; they are packed in ``image_id`` order. Every image is
    fully decoded once; an unreadable or corrupt one raises ``ValueError`` (``on_corrupt="fail"``)
    or is left out and listed in the report and in ``<name>.corrupt.json`` (``"skip"``).
    """
    started = time.perf_counter()
    image_root, out_path = Path(image_root), Path(out_path)
    rows = _rows_to_pack(rows, out_path, resize, on_corrupt)
    cap_sorted = _sorted_captions(captions) if captions is not None else None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _check_free_space(image_root, rows["image_id"].astype(str).tolist(), out_path, resize)
    _remove_outputs(out_path)  # start clean: leftovers of an interrupted run and the previous outputs
    report = PackReport(path=out_path)
    tmp_lmdb = partial_path(out_path)
    env = lmdb.open(str(tmp_lmdb), map_size=MAP_SIZE, subdir=False, lock=False, meminit=True,
                    sync=False, metasync=False, readahead=False, max_dbs=0)
    try:
        writer = _BatchedWriter(env)
        kept = _put_images(writer, rows["image_id"].astype(str).tolist(), image_root, out_path, resize=resize,
                           on_corrupt=on_corrupt, threads=threads or min(4, os.cpu_count() or 1), report=report)
        frame = _index_frame(rows, kept, relabel)
        meta = _pack_meta(rows, frame, resize=resize, params_fingerprint=params_fingerprint, relabel=relabel,
                          skipped=len(report.skipped))
        if cap_sorted is not None:
            _add_caption_refs(frame, meta, cap_sorted, out_path)
        writer.finish(META_KEY, json.dumps(meta, sort_keys=True).encode())
        env.sync(True)
    except BaseException:
        env.close()
        _remove(tmp_lmdb)  # a clean failure leaves nothing; a kill leaves only the .partial file
        raise
    env.close()
    _publish(out_path, frame, report.skipped)
    report.count = len(frame)
    report.seconds = time.perf_counter() - started
    log.info("%s: %d images, %.1f MB, %.1f s (%.0f images/s)", out_path, report.count, report.bytes / 1e6,
             report.seconds, report.images_per_s)
    return report


def _rows_to_pack(rows: pd.DataFrame, out_path: Path, resize: list[int] | None,
                  on_corrupt: str) -> pd.DataFrame:
    """The rows in image_id order, after checking them and the options."""
    if on_corrupt not in ("fail", "skip"):
        raise ValueError(f"on_corrupt: expected 'fail' or 'skip', got {on_corrupt!r}")
    if resize is not None and (len(resize) != 2 or min(int(v) for v in resize) <= 0):
        raise ValueError(f"resize: expected null or [height, width] > 0, got {resize!r}")
    missing = {"image_id", "pid", "camid"} - set(rows.columns)
    if missing:
        raise ValueError(f"rows for {out_path}: missing columns {sorted(missing)} (have {list(rows.columns)})")
    rows = rows.sort_values("image_id", kind="mergesort").reset_index(drop=True)
    if rows["image_id"].duplicated().any():
        dup = rows.loc[rows["image_id"].duplicated(), "image_id"].iloc[0]
        raise ValueError(f"rows for {out_path}: image_id {dup!r} appears more than once")
    if len(rows) >= 10**KEY_WIDTH:
        raise ValueError(f"rows for {out_path}: {len(rows)} images exceed the {KEY_WIDTH}-digit key space")
    return rows


def _remove_outputs(out_path: Path) -> None:
    """Every file a pack of ``out_path`` writes, finished or ``.partial``, and LMDB lock files."""
    tmp_lmdb, side = partial_path(out_path), sidecar_path(out_path)
    for stale in (tmp_lmdb, Path(str(tmp_lmdb) + "-lock"), partial_path(side), out_path,
                  Path(str(out_path) + "-lock"), side, corrupt_report_path(out_path)):
        _remove(stale)


class _BatchedWriter:
    """Appends to an LMDB in write transactions of COMMIT_EVERY entries (part of the byte-identical
    contract: the transaction boundaries shape the file)."""

    def __init__(self, env: lmdb.Environment) -> None:
        self._env, self._txn, self._pending = env, env.begin(write=True), 0

    def append(self, key: bytes, value: bytes) -> None:
        self._txn.put(key, value, append=True)
        self._pending += 1
        if self._pending == COMMIT_EVERY:
            self._txn.commit()
            self._txn, self._pending = self._env.begin(write=True), 0

    def finish(self, key: bytes, value: bytes) -> None:
        """The last entry, in the same transaction as the last batch, and commit."""
        self._txn.put(key, value, append=True)
        self._txn.commit()


@dataclass
class _Kept:
    """The images stored so far: the i-th went under ``key_of(i)``."""

    image_ids: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # row in the sorted rows
    sha1s: list[str] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)


def _put_images(writer: _BatchedWriter, image_ids: list[str], image_root: Path, out_path: Path, *,
                resize: list[int] | None, on_corrupt: str, threads: int, report: PackReport) -> _Kept:
    """Read, check and store every image in order (read on ``threads`` threads); a bad one stops
    the pack or, with ``on_corrupt="skip"``, goes to ``report.skipped``."""
    kept = _Kept()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = _bounded_map(pool, image_root, image_ids, resize, threads)
        progress = tqdm(results, total=len(image_ids), desc=f"pack {out_path.name}", unit="img", disable=None)
        for pos, (image_id, (data, height, width, reason)) in enumerate(zip(image_ids, progress)):
            if reason is not None:
                if on_corrupt == "fail":
                    raise ValueError(f"{image_root / image_id}: {reason} (pack.on_corrupt=fail; set it to skip "
                                     f"to leave such images out)")
                report.skipped.append((image_id, reason))
                continue
            writer.append(key_of(len(kept.positions)), data)
            kept.image_ids.append(image_id)
            kept.positions.append(pos)
            kept.sha1s.append(hashlib.sha1(data).hexdigest())
            kept.heights.append(height)
            kept.widths.append(width)
            report.bytes += len(data)
    return kept


def _index_frame(rows: pd.DataFrame, kept: _Kept, relabel: bool) -> pd.DataFrame:
    """The sidecar: one row per stored image, in key order."""
    picked = rows.iloc[kept.positions].reset_index(drop=True)
    return pd.DataFrame({
        "key": pd.Series([key_of(i).decode() for i in range(len(picked))], dtype=object).astype(str),
        "image_id": pd.Series(kept.image_ids, dtype=object).astype(str),
        "pid": picked["pid"].astype(np.int64).to_numpy(),
        "label": _labels(picked["pid"].to_numpy(), relabel),
        "camid": picked["camid"].astype(np.int64).to_numpy(),
        "sha1": pd.Series(kept.sha1s, dtype=object).astype(str),
        "height": np.asarray(kept.heights, dtype=np.int64),
        "width": np.asarray(kept.widths, dtype=np.int64),
    })


def _pack_meta(rows: pd.DataFrame, frame: pd.DataFrame, *, resize: list[int] | None,
               params_fingerprint: dict | None, relabel: bool, skipped: int) -> dict:
    """The :data:`META_KEY` record: what a reader checks the LMDB and its sidecar against."""
    return {
        "format": FORMAT_VERSION,
        "count": len(frame),
        "params": {**(params_fingerprint or {}), "resize": list(resize) if resize is not None else None},
        "rows_sha1": frame_digest(rows[["image_id", "pid", "camid"]].astype({"image_id": str})),
        "index_sha1": frame_digest(frame[["key", "image_id", "sha1"]]),
        "relabel": bool(relabel),
        "num_ids": int(frame["pid"].nunique()),
        "skipped": skipped,
    }


def _add_caption_refs(frame: pd.DataFrame, meta: dict, cap_sorted: pd.DataFrame, out_path: Path) -> None:
    """Each image's rows in the sorted captions (sidecar columns) and the captions' digest (meta)."""
    start, count = caption_refs(frame["image_id"], cap_sorted["image_id"])
    frame["caption_start"] = start
    frame["caption_count"] = count
    meta["captions_sha1"] = frame_digest(cap_sorted[["image_id", "caption_idx", "caption"]])
    meta["captions_rows"] = len(cap_sorted)
    without = int((count == 0).sum())
    if without:
        log.warning("%s: %d of %d images have no caption", out_path, without, len(frame))


def _publish(out_path: Path, frame: pd.DataFrame, skipped: list[tuple[str, str]]) -> None:
    """Write the sidecar (and the corrupt-image list) next to the finished ``.partial`` LMDB, then
    give both their final names, sidecar first and LMDB last."""
    tmp_lmdb, side = partial_path(out_path), sidecar_path(out_path)
    tmp_side, report_file = partial_path(side), corrupt_report_path(out_path)
    try:  # reliability (issue 9): a full disk while writing the sidecar/report leaves no partial files
        _fsync_path(tmp_lmdb)
        _write_sidecar(frame, tmp_side, tmp_lmdb.stat().st_size)
        _fsync_path(tmp_side)
        if skipped:
            report_file.write_text(json.dumps(
                {"lmdb": str(out_path), "skipped": [{"image_id": i, "reason": r} for i, r in skipped]},
                indent=2) + "\n")
            log.warning("%s: skipped %d corrupt or unreadable images (listed in %s)", out_path, len(skipped),
                        report_file)
        os.replace(tmp_side, side)
    except BaseException:
        for stale in (tmp_lmdb, tmp_side, side, report_file):
            _remove(stale)
        raise
    os.replace(tmp_lmdb, out_path)
    _fsync_path(out_path.parent)


def _check_free_space(image_root: Path, image_ids: list[str], out_path: Path, resize) -> None:
    """Refuse up front when the LMDB would not fit on the disk (reliability, issue 9).

    Estimate: the source files' bytes (values are the original bytes), or h*w*3/4 bytes per image
    when re-encoding, + 10 % + 16 MiB for LMDB pages, the sidecar and the report.
    """
    if resize is not None:
        need = len(image_ids) * int(resize[0]) * int(resize[1]) * 3 // 4
    else:
        need = 0
        for image_id in image_ids:
            try:
                need += os.stat(image_root / image_id).st_size
            except OSError:
                pass  # reported as unreadable while packing
    required = int(need * 1.1) + (16 << 20)
    avail = disk.free_bytes(out_path.parent)
    if required > avail:
        raise disk.InsufficientSpaceError(
            f"{out_path}: packing needs about {required / 2**20:.1f} MiB but only {avail / 2**20:.1f} MiB "
            f"are free on {out_path.parent}; free some space or move data/lmdb to a larger disk")


def _labels(pids: np.ndarray, relabel: bool) -> np.ndarray:
    if not relabel:
        return np.full(len(pids), -1, dtype=np.int64)
    uniq = np.unique(pids)
    return np.searchsorted(uniq, pids).astype(np.int64)


def _bounded_map(pool, image_root, image_ids, resize, threads):
    """Ordered map with a bounded number of images in flight (memory stays flat on 2M images)."""
    from collections import deque

    window = deque()
    for iid in image_ids:
        window.append(pool.submit(_load_one, image_root, iid, resize))
        if len(window) >= 8 * threads:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


# ---------------------------------------------------------------------------------------------
# Reading and checking
# ---------------------------------------------------------------------------------------------


def _open_env(path: Path) -> lmdb.Environment:
    return lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=False, meminit=False,
                     max_dbs=0)


# One read-only environment per file per process (py-lmdb refuses to open a file twice in a
# process): (st_dev, st_ino) -> (pid that opened it, env).
_ENVS: dict[tuple[int, int], tuple[int, lmdb.Environment]] = {}


def _file_id(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _process_env(path: Path) -> lmdb.Environment:
    """This process's environment for ``path``, opened on first use in each process."""
    fid, pid = _file_id(path), os.getpid()
    cached = _ENVS.get(fid)
    if cached is not None and cached[0] == pid:
        return cached[1]
    try:
        env = _open_env(path)
    except lmdb.Error:
        if cached is None:
            raise
        # The parent had it open when it forked, and py-lmdb refuses a second open of the same
        # file. The inherited handle is safe to read through: the file is immutable, mapped
        # read-only, and opened with lock=False (no lock file, no reader table, no fcntl locks).
        env = cached[1]
    _ENVS[fid] = (pid, env)
    return env


def _matches(expected, actual) -> bool:
    return json.loads(json.dumps(expected)) == json.loads(json.dumps(actual))


def _read_checked(path: Path, expected_meta: dict | None) -> tuple[dict, pd.DataFrame]:
    """All of :func:`check_lmdb`; returns (meta, sidecar)."""
    path = Path(path)
    side = sidecar_path(path)
    if not path.is_file():
        hint = " (an interrupted pack left a .partial file; rerun the pack stage)" \
            if partial_path(path).exists() else " (run the pack stage: dvc repro pack@<dataset>)"
        raise ValueError(f"{path}: LMDB missing{hint}")
    if not side.is_file():
        raise ValueError(f"{path}: sidecar {side} missing (rerun the pack stage)")
    try:
        pfile = pq.ParquetFile(side)
        recorded = (pfile.schema_arrow.metadata or {}).get(SIDECAR_SIZE_KEY)
        sidecar = pfile.read().to_pandas()
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path}: sidecar {side} is unreadable: {exc}") from exc
    size = path.stat().st_size
    if recorded is not None and int(recorded) != size:
        raise ValueError(f"{path}: truncated or altered: {size} bytes, the pack wrote {int(recorded)}")
    cached = _ENVS.get(_file_id(path))
    temporary = cached is None or cached[0] != os.getpid()
    try:
        env = _open_env(path) if temporary else cached[1]
    except lmdb.Error as exc:
        if cached is None:
            raise ValueError(f"{path}: not a readable LMDB (truncated or corrupt?): {exc}") from exc
        env, temporary = cached[1], False
    try:
        info, stat = env.info(), env.stat()
        need = (info["last_pgno"] + 1) * stat["psize"]
        if size < need:
            raise ValueError(f"{path}: truncated: {size} bytes, its pages need {need}")
        with env.begin() as txn:
            raw = txn.get(META_KEY)
        if raw is None:
            raise ValueError(f"{path}: no {META_KEY.decode()} key (not written by dmf's pack stage?)")
        meta = json.loads(raw)
        entries = stat["entries"]
    finally:
        if temporary:
            env.close()  # workers open their own on first access
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {meta.get('format')!r}, this code reads format {FORMAT_VERSION}; repack")
    if entries != meta["count"] + 1:
        raise ValueError(f"{path}: {entries - 1} images stored, its metadata says {meta['count']}")
    if len(sidecar) != meta["count"]:
        raise ValueError(f"{path}: sidecar {side} has {len(sidecar)} rows, the LMDB holds {meta['count']} images")
    missing = set(SIDECAR_COLUMNS) - set(sidecar.columns)
    if missing:
        raise ValueError(f"{path}: sidecar {side} lacks columns {sorted(missing)}")
    if frame_digest(sidecar[["key", "image_id", "sha1"]]) != meta["index_sha1"]:
        raise ValueError(f"{path}: sidecar {side} does not match the LMDB's keys (index digest differs); repack")
    for name, want in (expected_meta or {}).items():
        if name in meta["params"]:
            have = meta["params"][name]
        elif name in meta:
            have = meta[name]
        else:
            raise ValueError(f"{path}: built without {name!r} in its params; this stage expects {want!r}; repack")
        if not _matches(want, have):
            raise ValueError(f"{path}: built with {name}={have!r}, this stage expects {want!r}; rerun the pack stage")
    return meta, sidecar


def check_lmdb(path: Path, expected_meta: dict | None = None) -> None:
    """Raise ``ValueError`` naming ``path`` if the LMDB is missing, truncated, does not match its
    sidecar, or was built with params other than ``expected_meta`` (compared key by key)."""
    _read_checked(path, expected_meta)


class LmdbReader:
    """Random access to a packed split. Checked on construction; the LMDB environment is opened
    lazily in each process (fork- and pickle-safe: DataLoader workers open their own,
    ``readonly=True, lock=False``, so no lock file is created or touched)."""

    def __init__(self, path: Path, expected_meta: dict | None = None):
        self.path = Path(path)
        self.meta, self.sidecar = _read_checked(self.path, expected_meta)
        self._txn = None
        self._pid = None

    def __len__(self) -> int:
        return int(self.meta["count"])

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_txn"] = state["_pid"] = None
        return state

    def _handle(self):
        if self._pid != os.getpid() or self._txn is None:
            self._txn = _process_env(self.path).begin(buffers=False)
            self._pid = os.getpid()
        return self._txn

    def get_bytes(self, index: int) -> bytes:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: index {index} out of range [0, {len(self)})")
        data = self._handle().get(key_of(index))
        if data is None:
            raise KeyError(f"{self.path}: key {key_of(index).decode()} missing")
        return data

    def close(self) -> None:
        """End this reader's transaction (the per-process environment stays open for others)."""
        if self._txn is not None and self._pid == os.getpid():
            self._txn.abort()
        self._txn = self._pid = None


def content_digest(path: str | Path) -> str:
    """sha256 of a packed split's content: its embedded metadata (digests of rows, index and
    captions, pack params) and its sidecar index (one sha1 per stored image). Reads no image."""
    meta = LmdbReader(Path(path)).meta  # checked against the sidecar on construction
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    h.update(hashlib.sha256(sidecar_path(Path(path)).read_bytes()).hexdigest().encode())
    return h.hexdigest()
