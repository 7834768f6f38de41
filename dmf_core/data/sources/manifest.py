"""The manifest: schema, validation, deterministic parquet I/O, statistics and image checks.

One row per image: ``image_id`` (posix path relative to ``data/raw/<dataset>/``), ``split``
(train|query|gallery), ``pid`` (int, >= 0: junk -1 is dropped by the parsers, Market distractors
are pid 0), ``camid`` (0-based int), ``dataset`` (str). FineGPR-layout manifests add
``viewpoint``, ``weather``, ``illumination``, ``scene`` (1-based codes). Other columns are
allowed and kept after these, in their order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from dmf_core.data.images import DEFAULT_MAX_IMAGE_PIXELS, open_checked

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("image_id", "split", "pid", "camid", "dataset")
FINEGPR_COLUMNS = ("viewpoint", "weather", "illumination", "scene")
SPLITS = ("train", "query", "gallery")
_STRING_COLUMNS = ("image_id", "split", "dataset")
_INT_COLUMNS = ("pid", "camid", *FINEGPR_COLUMNS)


class StatisticsError(ValueError):
    """A dataset whose per-split counts differ from the official statistics."""


def order_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Known columns first (MANIFEST_COLUMNS, then the FineGPR codes), others after in their order."""
    known = [c for c in (*MANIFEST_COLUMNS, *FINEGPR_COLUMNS) if c in df.columns]
    rest = [c for c in df.columns if c not in known]
    return df[known + rest]


def _is_int_column(s: pd.Series) -> bool:
    return pd.api.types.is_integer_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype)


def validate_manifest(df: pd.DataFrame) -> None:
    """Raise ValueError naming the column (and a bad value) when ``df`` breaks the schema."""
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"manifest: missing column(s) {missing} (expected {list(MANIFEST_COLUMNS)})")
    for col in _STRING_COLUMNS:
        s = df[col]
        if s.isna().any():
            raise ValueError(f"manifest.{col}: {int(s.isna().sum())} missing value(s)")
        bad = s[[not isinstance(v, str) or not v for v in s]]
        if len(bad):
            raise ValueError(f"manifest.{col}: expected non-empty strings, got {bad.iloc[0]!r}")
    for col in _INT_COLUMNS:
        if col in df.columns and not _is_int_column(df[col]):
            raise ValueError(f"manifest.{col}: expected integers, got dtype {df[col].dtype}")
    bad_split = ~df["split"].isin(SPLITS)
    if bad_split.any():
        raise ValueError(f"manifest.split: {df.loc[bad_split, 'split'].iloc[0]!r} is not one of {SPLITS}")
    for col in ("pid", "camid"):
        neg = df[col] < 0
        if neg.any():
            row = df[neg].iloc[0]
            raise ValueError(f"manifest.{col}: {row[col]} < 0 for {row['image_id']!r} (junk must be dropped)")
    for col in FINEGPR_COLUMNS:
        if col in df.columns and (df[col] < 1).any():
            raise ValueError(f"manifest.{col}: codes are 1-based, got {int(df[col].min())}")
    ids = df["image_id"].astype(str)
    unclean = (ids.str.startswith("/") | ids.str.startswith("./") | ids.str.contains("\\", regex=False)
               | ids.str.contains(r"(?:^|/)\.\.(?:/|$)", regex=True) | ids.str.contains("//", regex=False))
    if unclean.any():
        raise ValueError(f"manifest.image_id: {ids[unclean].iloc[0]!r} is not a clean relative posix path")
    dup = df["image_id"].duplicated()
    if dup.any():
        raise ValueError(f"manifest.image_id: {df.loc[dup, 'image_id'].iloc[0]!r} appears more than once")
    if df["dataset"].nunique() > 1:
        raise ValueError(f"manifest.dataset: one dataset per manifest, got {sorted(df['dataset'].unique())}")


def _arrow_table(df: pd.DataFrame) -> pa.Table:
    fields, arrays = [], []
    for col in df.columns:
        if col in _STRING_COLUMNS:
            typ = pa.string()
        elif col in _INT_COLUMNS:
            typ = pa.int64()
        else:
            typ = None
        arr = pa.array(df[col].tolist() if typ is not None else df[col], type=typ, from_pandas=True)
        fields.append(pa.field(col, arr.type, nullable=col not in (*MANIFEST_COLUMNS, *FINEGPR_COLUMNS)))
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))  # no pandas metadata, no index


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Validate, sort by (split, image_id) and write parquet atomically with deterministic bytes."""
    validate_manifest(df)
    df = order_columns(df.sort_values(["split", "image_id"], kind="stable").reset_index(drop=True))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(_arrow_table(df), tmp, compression="zstd", write_statistics=False,
                       store_schema=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read and validate a manifest written by :func:`write_manifest`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found (run the download stage first)")
    df = pq.read_table(path).to_pandas()
    try:
        validate_manifest(df)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return df


# ---------------------------------------------------------------------------------------------
# Official statistics
# ---------------------------------------------------------------------------------------------


def statistics(df: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{split: {"ids": distinct pids (pid 0 distractors count as one), "images": rows}}."""
    return {str(split): {"ids": int(g["pid"].nunique()), "images": int(len(g))}
            for split, g in df.groupby("split", sort=True)}


#: reports/stats/datasets/<name>.json "official_statistics" of a copy let through by allow_partial
ACCEPTED_PARTIAL = "differ, accepted (allow_partial)"


def check_statistics(df: pd.DataFrame, expected: Mapping[str, Mapping[str, int | None]],
                     allow_partial: bool = False) -> pd.DataFrame:
    """Compare per-split ids/images with ``expected`` ({split: {"ids", "images"}}, None = unknown).

    Returns the expected-vs-found table. On a mismatch raises :class:`StatisticsError` with the
    table in the message, unless ``allow_partial`` (then it only warns). The folder the layout
    parser read (``df.attrs["folder"]``) heads the table, so a wrong folder shows at once.
    """
    found = statistics(df)
    if not expected:
        log.warning("no official statistics known; found %s in folder %s", found, df.attrs.get("folder", "?"))
    rows = []
    for split in [s for s in SPLITS if s in expected or s in found] + sorted(
            set(expected) - set(SPLITS)):
        exp = expected.get(split, {"ids": 0, "images": 0})
        got = found.get(split, {"ids": 0, "images": 0})
        row = {"split": split}
        ok = True
        for key in ("ids", "images"):
            want = exp.get(key)
            row[f"expected_{key}"] = "?" if want is None else int(want)
            row[f"found_{key}"] = got[key]
            ok &= want is None or int(want) == got[key]
        row["ok"] = ok
        rows.append(row)
    table = pd.DataFrame(rows, columns=["split", "expected_ids", "found_ids", "expected_images",
                                        "found_images", "ok"])
    if not table["ok"].all():
        text = table.to_string(index=False)
        if df.attrs.get("folder"):
            text = f"read from folder {df.attrs['folder']}\n{text}"
        if allow_partial:
            log.warning("dataset differs from the official statistics (allow_partial is set):\n%s", text)
        else:
            raise StatisticsError(
                "dataset differs from the official statistics (set allow_partial: true in params to "
                f"use it anyway):\n{text}")
    return table


# ---------------------------------------------------------------------------------------------
# Image verification
# ---------------------------------------------------------------------------------------------


#: ``df.attrs`` flag of a manifest whose layout already decoded every image and refused any
#: unreadable one (the csv layout): :func:`verify_images` does not decode them a second time.
IMAGES_DECODED = "images_decoded"


def check_image(path: Path) -> str | None:
    """None when the image decodes completely, else the reason.

    Runs in a thread pool, so the size guard is :func:`~dmf_core.data.images.open_checked`'s
    plain pixel-count check (no ``warnings.catch_warnings``: it swaps process-global state and
    is not thread-safe); an image over the limit is refused from its header, never decoded.
    """
    try:
        with open_checked(path, path.name) as img:
            img.load()
            if img.width <= 0 or img.height <= 0:
                return "empty image"
    except FileNotFoundError:
        return "missing file"
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad image, never a crash
        return f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("\t", " ")
    return None


def verify_images(df: pd.DataFrame, root: str | Path, report_path: str | Path,
                  workers: int | None = None) -> list[str]:
    """Decode every image of the manifest; list the unreadable ones (path<TAB>reason) in a report.

    Returns the sorted image_ids that failed. The report is always written (empty when all
    images are fine). Truncated images are failures (PIL's LOAD_TRUNCATED_IMAGES stays off) and
    the decompression-bomb guard stays on. A manifest flagged :data:`IMAGES_DECODED` is not
    decoded again: its layout refused any unreadable image already.
    """
    from PIL import Image, ImageFile

    if Image.MAX_IMAGE_PIXELS is None:
        Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        log.warning("PIL ImageFile.LOAD_TRUNCATED_IMAGES was on; turning it off to detect truncation")
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    root = Path(root)
    ids = sorted(df["image_id"].tolist()) if not df.attrs.get(IMAGES_DECODED) else []
    workers = workers or min(8, os.cpu_count() or 1)
    bad: list[tuple[str, str]] = []
    batch = 4096  # bounded number of pending futures, even for FineGPR's 2M images
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
            total=len(ids), desc="verify images", unit="img", disable=None) as bar:
        for start in range(0, len(ids), batch):
            chunk = ids[start:start + batch]
            for image_id, reason in zip(chunk, pool.map(check_image, (root / i for i in chunk))):
                if reason is not None:
                    bad.append((image_id, reason))
            bar.update(len(chunk))
    report_path = Path(report_path)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = report_path.with_name(f".{report_path.name}.tmp")
    tmp.write_text("".join(f"{i}\t{r}\n" for i, r in bad), encoding="utf-8")
    os.replace(tmp, report_path)
    if bad:
        log.warning("%d of %d images are unreadable; listed in %s", len(bad), len(ids), report_path)
    return [i for i, _ in bad]
