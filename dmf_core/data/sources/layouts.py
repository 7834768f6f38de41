"""Parse a dataset's real on-disk layout into a manifest (one row per image).

Every parser takes ``root`` = ``data/raw/<dataset>`` and looks *below* it for the real layout
folder, so both ``root/Market-1501-v15.09.15/bounding_box_train`` (an extracted archive) and
``root/bounding_box_train`` (a generated or hand-placed folder) work.

Manifest columns (see ARCHITECTURE.md and :mod:`dmf_core.data.sources.manifest`):
``image_id`` (posix path relative to ``root``), ``split`` (train|query|gallery), ``pid`` (int,
junk -1 dropped, Market distractors 0 kept), ``camid`` (0-based int), ``dataset``; the FineGPR
layout adds ``viewpoint``, ``weather``, ``illumination``, ``scene`` (the 1-based codes of the
file name); the ``csv`` layout (the user's own images, :func:`parse_csv`) adds an optional
``caption`` (str, null where the CSV's cell is empty). Rows are sorted by (split, image_id). A
malformed file name raises ValueError naming the file. The folder the rows come from is
``df.attrs["folder"]`` (relative to ``root``).

The search never guesses: a root holding several candidate folders (Market-1501 next to
``cuhk03-np/``, MSMT17 V1 next to V2), or none of the asked-for variant (``labeled/`` when only
``detected/`` is there), is refused with the candidates found.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import pandas as pd

from dmf_core.data.sources.manifest import IMAGES_DECODED, SPLITS, check_image, order_columns

log = logging.getLogger(__name__)

LAYOUTS = ("finegpr", "market", "msmt17", "cuhk03np", "randperson", "cuhksysu", "csv")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
SKIP_DIRS = frozenset({"__MACOSX", ".git", ".dvc"})
MAX_DEPTH = 4  # how deep below root the real layout folder may sit

# Market-1501 / DukeMTMC-reID / CUHK03-NP: "0002_c1s1_000451_03.jpg", "0001_c2_f0046182.jpg"
MARKET_RE = re.compile(r"^(-?\d+)_c(\d+)")
MARKET_SPLITS = {"bounding_box_train": "train", "query": "query", "bounding_box_test": "gallery"}
# RandPerson: "000000_s00_c00_f000264.jpg"
RANDPERSON_RE = re.compile(r"^(\d+)_s(\d+)_c(\d+)_f(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)
RANDPERSON_CAM_OFFSETS = (0, 2, 4, 6, 8, 9, 10, 12, 13, 14, 15)  # QAConv randperson.py, per scene
# CUHK-SYSU crops as torchreid / fast-reid read them: cuhksysu/cropped_images/p<pid>_s<scene>_<n>.jpg
# (fast-reid's regex p([-\d]+)_s(\d)); all train, camid constant 0, so a source only, never a target
CUHKSYSU_DIR = "cropped_images"
CUHKSYSU_RE = re.compile(r"^p(-?\d+)_s(\d+)")
# FineGPR: "0001_c01_w01_l01_p01.jpg" = id, viewpoint, weather, illumination, scene (background)
FINEGPR_RE = re.compile(r"^(\d+)_c(\d+)_w(\d+)_l(\d+)_p(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)
FINEGPR_CODES = {"viewpoint": 36, "weather": 7, "illumination": 7, "scene": 9}  # valid 1..max
FINEGPR_COLUMNS = tuple(FINEGPR_CODES)
# MSMT17: V1 folders train/test, V2 (faces blurred) mask_train_v2/mask_test_v2
MSMT_DIRS = {"v1": ("train", "test"), "v2": ("mask_train_v2", "mask_test_v2")}
MSMT_LISTS = (("list_train.txt", "train", 0), ("list_val.txt", "train", 0),
              ("list_query.txt", "query", 1), ("list_gallery.txt", "gallery", 1))
# The user's own images: <folder>/dataset.csv, one row per image (docs/datasets.md)
CSV_NAME = "dataset.csv"
CSV_COLUMNS = ("path", "pid", "camid", "split")
CSV_OPTIONAL = ("caption",)
TEXT_COLUMNS = ("image_id", "split", "caption")  # the manifest columns a parser fills with strings


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _walk_dirs(root: Path, max_depth: int = MAX_DEPTH) -> Iterator[tuple[Path, list[str], list[str]]]:
    """os.walk below root (sorted, hidden/__MACOSX skipped, depth-limited); yields (dir, dirs, files).

    The caller may prune ``dirs`` in place, like os.walk.
    """
    base_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        path = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        if len(path.parts) - base_depth >= max_depth:
            dirnames[:] = []
        yield path, dirnames, filenames


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _shown(folder: Path, root: Path) -> str:
    return _rel(folder, root) or "."


def _in_path(variant: str) -> Callable[[Path, Path], bool]:
    """Candidate test: ``variant`` is one of the folder names between root and the candidate."""
    return lambda folder, root: variant.lower() in (p.lower() for p in folder.relative_to(root).parts)


def _choose(candidates: list[Path], root: Path, dataset: str, what: str, variant: str | None = None,
            fits: Callable[[Path, Path], bool] | None = None) -> Path:
    """The one layout folder below root; none, several, or none of ``variant`` is refused.

    ``fits(folder, root)`` says whether a candidate is of ``variant`` (default: the variant is a
    folder name on its path).
    """
    if not candidates:
        raise ValueError(f"{root}: no {what} found below it (searched {MAX_DEPTH} levels deep)")
    found = ", ".join(_shown(c, root) for c in candidates)
    chosen = candidates
    if variant is not None:
        test = fits or _in_path(variant)
        chosen = [c for c in candidates if test(c, root)]
        if not chosen:
            raise ValueError(f"{root}: dataset {dataset!r} needs the {variant!r} {what}, but only {found} "
                             f"is there; use an archive or folder that holds the {variant} variant")
    if len(chosen) > 1:
        listed = ", ".join(_shown(c, root) for c in chosen)
        raise ValueError(f"{root}: dataset {dataset!r}: {len(chosen)} candidates for its {what} ({listed}), "
                         f"so which one is meant is ambiguous. Point datasets.{dataset}.location at an archive "
                         "or folder that holds only this dataset")
    return chosen[0]


def _frame(rows: list[tuple], columns: list[str], dataset: str, folder: Path, root: Path) -> pd.DataFrame:
    df = pd.DataFrame.from_records(rows, columns=columns)
    if df.empty:
        df = pd.DataFrame({c: pd.Series(dtype="int64") for c in columns})
        for col in TEXT_COLUMNS:
            if col in df.columns:
                df[col] = df[col].astype(str)
    for col in columns:
        if col not in TEXT_COLUMNS:
            df[col] = df[col].astype("int64")
    df["dataset"] = dataset
    df = order_columns(df.sort_values(["split", "image_id"], kind="stable").reset_index(drop=True))
    df.attrs["folder"] = _shown(folder, root)
    return df


# ---------------------------------------------------------------------------------------------
# Market-1501 / DukeMTMC-reID / CUHK03-NP
# ---------------------------------------------------------------------------------------------


def _find_market_dirs(root: Path) -> list[Path]:
    found = []
    for path, dirnames, _ in _walk_dirs(root):
        if any(d in MARKET_SPLITS for d in dirnames):
            found.append(path)
            dirnames[:] = []  # do not list the (large) split folders while searching
    return found


def parse_market_dir(base: Path, root: Path) -> list[tuple]:
    """Rows (image_id, split, pid, camid) of one Market-style folder; junk (-1) dropped."""
    rows: list[tuple] = []
    junk = 0
    for folder, split in MARKET_SPLITS.items():
        d = base / folder
        if not d.is_dir():
            log.warning("%s: no %s/ folder, split %r is empty", base, folder, split)
            continue
        with os.scandir(d) as it:
            names = sorted(e.name for e in it if e.is_file() and _is_image(e.name))
        prefix = _rel(d, root)
        for name in names:
            m = MARKET_RE.match(name)
            if m is None:
                raise ValueError(f"{d / name}: file name does not match <pid>_c<cam>... "
                                 f"(regex {MARKET_RE.pattern})")
            pid, cam = int(m.group(1)), int(m.group(2))
            if pid == -1:
                junk += 1
                continue
            if pid < -1 or cam < 1:
                raise ValueError(f"{d / name}: pid {pid} / camera {cam} out of range "
                                 "(expected pid >= -1, camera >= 1)")
            rows.append((f"{prefix}/{name}", split, pid, cam - 1))
    if junk:
        log.info("%s: dropped %d junk images (pid -1)", base, junk)
    return rows


def parse_market(root: Path, dataset: str, variant: str | None = None) -> pd.DataFrame:
    base = _choose(_find_market_dirs(root), root, dataset, "Market-style folder (bounding_box_train/query/"
                   "bounding_box_test)", variant)
    return _frame(parse_market_dir(base, root), ["image_id", "split", "pid", "camid"], dataset, base, root)


def parse_cuhk03np(root: Path, dataset: str, variant: str | None = None) -> pd.DataFrame:
    if variant is None:
        variant = "labeled" if "labeled" in dataset.lower() else "detected"
    return parse_market(root, dataset, variant)


# ---------------------------------------------------------------------------------------------
# MSMT17 (list files)
# ---------------------------------------------------------------------------------------------


def _read_list(path: Path) -> list[tuple[int, str, int]]:
    """(line number, relative path, pid) of every entry of an MSMT17 list file."""
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{path}:{lineno}: expected '<relative path> <pid>', got {line!r}")
        out.append((lineno, parts[0], int(parts[1])))
    return out


def _msmt_versions(base: Path) -> list[str]:
    """Which MSMT17 image folders (v1: train/test, v2: mask_*_v2) a list-file folder has."""
    return [v for v, dirs in MSMT_DIRS.items() if any((base / d).is_dir() for d in dirs)]


def _msmt_version(variant: str) -> str:
    return variant.lower().rsplit("_", 1)[-1]  # "MSMT17_V1" -> "v1"


def _msmt_fits(variant: str) -> Callable[[Path, Path], bool]:
    return lambda folder, root: _msmt_version(variant) in _msmt_versions(folder)


def parse_msmt17(root: Path, dataset: str, variant: str | None = None,
                 combine_all: bool | None = None) -> pd.DataFrame:
    """MSMT17 V1/V2 from list_{train,val,query,gallery}.txt; train = list_train + list_val.

    ``combine_all`` (default: dataset name ends with ``_all``) puts train+val+query+gallery into
    one train split, query/gallery pids offset past the train pids (QAConv's combine_all).
    """
    if combine_all is None:
        combine_all = dataset.lower().endswith("_all")
    candidates = []
    for path, dirnames, filenames in _walk_dirs(root):
        if "list_train.txt" in filenames or "list_query.txt" in filenames:
            candidates.append(path)
            dirnames[:] = []  # do not list the image folders while searching
    base = _choose(candidates, root, dataset, "MSMT17 folder (list_train.txt ...)", variant,
                   _msmt_fits(variant) if variant else None)
    versions = _msmt_versions(base)
    if variant:
        versions = [v for v in versions if v == _msmt_version(variant)]
    if len(versions) != 1:
        raise ValueError(f"{base}: expected the image folders of one MSMT17 version, train/+test/ (V1) or "
                         f"mask_train_v2/+mask_test_v2/ (V2); found {versions or 'neither'}")
    version = versions[0]
    train_dir, test_dir = MSMT_DIRS[version]
    log.info("%s: MSMT17 %s folders %s/, %s/", base, version.upper(), train_dir, test_dir)
    rows: list[tuple] = []
    listed_at: dict[str, str] = {}  # image_id -> "list file:line", to name both ends of a duplicate
    for list_name, split, is_test in MSMT_LISTS:
        list_path = base / list_name
        if not list_path.is_file():
            raise ValueError(f"{list_path}: MSMT17 list file missing")
        folder = base / (test_dir if is_test else train_dir)
        prefix = _rel(folder, root)
        for lineno, rel, pid in _read_list(list_path):
            name = rel.rsplit("/", 1)[-1]
            fields = name.split("_")
            if len(fields) < 3 or not fields[2].isdigit() or int(fields[2]) < 1 or pid < 0:
                raise ValueError(f"{list_path}: entry {rel!r} (pid {pid}) does not look like "
                                 "<pid>/<pid>_<idx>_<cam>_<date><time>_..._<n>.jpg with pid >= 0")
            if ".." in rel.split("/") or rel.startswith("/"):
                raise ValueError(f"{list_path}: entry {rel!r} leaves the image folder")
            image_id, here = f"{prefix}/{rel}", f"{list_path}:{lineno}"
            if image_id in listed_at:
                raise ValueError(f"{base}: image {image_id!r} listed twice, at {listed_at[image_id]} and {here}; "
                                 "remove one of the two lines")
            listed_at[image_id] = here
            rows.append((image_id, split, pid, int(fields[2]) - 1, is_test))
    if combine_all:
        offset = max((r[2] for r in rows if not r[4]), default=-1) + 1
        rows = [(r[0], "train", r[2] + offset if r[4] else r[2], r[3], r[4]) for r in rows]
        log.info("%s: combine_all, query/gallery pids offset by %d", base, offset)
    return _frame([r[:4] for r in rows], ["image_id", "split", "pid", "camid"], dataset, base, root)


# ---------------------------------------------------------------------------------------------
# RandPerson
# ---------------------------------------------------------------------------------------------


def _collect_images(base: Path) -> Iterator[Path]:
    for path, _, filenames in _walk_dirs(base, max_depth=MAX_DEPTH):
        for name in sorted(filenames):
            if _is_image(name):
                yield path / name


def parse_randperson(root: Path, dataset: str, variant: str | None = None) -> pd.DataFrame:
    """RandPerson ``pid_sSS_cCC_fFFFFFF.jpg``; camid = scene offset + cam; everything is train."""
    want = (variant or "randperson_subset").lower()
    named = [p for p, _, _ in _walk_dirs(root) if p != root and p.name.lower() == want]
    base = _choose(named, root, dataset, f"{want} folder") if named else root
    rows = []
    for path in _collect_images(base):
        m = RANDPERSON_RE.match(path.name)
        if m is None:
            raise ValueError(f"{path}: file name does not match <pid>_s<scene>_c<cam>_f<frame>.jpg")
        pid, scene, cam = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if scene >= len(RANDPERSON_CAM_OFFSETS):
            raise ValueError(f"{path}: scene s{scene:02d} out of range (expected s00..s10)")
        rows.append((_rel(path, root), "train", pid, RANDPERSON_CAM_OFFSETS[scene] + cam))
    return _frame(rows, ["image_id", "split", "pid", "camid"], dataset, base, root)


# ---------------------------------------------------------------------------------------------
# CUHK-SYSU (the cropped person images of the person-search set; a training source only)
# ---------------------------------------------------------------------------------------------


def parse_cuhksysu(root: Path, dataset: str) -> pd.DataFrame:
    """CUHK-SYSU ``cropped_images/p<pid>_s<scene>_<n>.jpg``: every crop is train, camid 0.

    pid is the number after ``p`` (torchreid: the name's first field; fast-reid: regex
    ``p([-\\d]+)_s(\\d)``). Non-image files are ignored, as in Market-1501; an image whose name
    does not match, or has a negative pid, raises ValueError naming the file.
    """
    found = []
    for path, dirnames, _ in _walk_dirs(root):
        if path != root and path.name == CUHKSYSU_DIR:
            found.append(path)
            dirnames[:] = []
    base = _choose(found, root, dataset, f"CUHK-SYSU {CUHKSYSU_DIR}/ folder")
    with os.scandir(base) as it:
        names = sorted(e.name for e in it if e.is_file() and _is_image(e.name))
    prefix, rows = _rel(base, root), []
    for name in names:
        m = CUHKSYSU_RE.match(name)
        if m is None:
            raise ValueError(f"{base / name}: file name does not match p<pid>_s<scene>_<n>.jpg "
                             f"(regex {CUHKSYSU_RE.pattern})")
        pid = int(m.group(1))
        if pid < 0:
            raise ValueError(f"{base / name}: pid {pid} out of range (expected pid >= 0)")
        rows.append((f"{prefix}/{name}", "train", pid, 0))
    return _frame(rows, ["image_id", "split", "pid", "camid"], dataset, base, root)


# ---------------------------------------------------------------------------------------------
# FineGPR
# ---------------------------------------------------------------------------------------------

FINEGPR_VARIANT_DIRS = {"full": "FineGPR", "subset": "FineGPR_subset"}


def parse_finegpr(root: Path, dataset: str, variant: str | None = None) -> pd.DataFrame:
    """FineGPR ``IIII_cCC_wWW_lLL_pPP.jpg`` (full: FineGPR/<id>/..., subset: FineGPR_subset/...).

    ``variant`` is "full" or "subset"; by default the full set is used when both are present.
    Without either folder every matching image below root is used (e.g. SynthPed output).
    """
    if variant is not None and variant not in FINEGPR_VARIANT_DIRS:
        raise ValueError(f"finegpr variant {variant!r}: expected one of {sorted(FINEGPR_VARIANT_DIRS)}")
    found: dict[str, list[Path]] = {k: [] for k in FINEGPR_VARIANT_DIRS}
    for path, dirnames, _ in _walk_dirs(root):
        for key, dirname in FINEGPR_VARIANT_DIRS.items():
            if path != root and path.name == dirname:
                found[key].append(path)
                dirnames[:] = []
    order = [variant] if variant else ["full", "subset"]
    base = None
    for key in order:
        if found[key]:
            base = _choose(found[key], root, dataset, f"{FINEGPR_VARIANT_DIRS[key]}/ folder")
            break
    if base is None:
        if variant:
            raise ValueError(f"{root}: no {FINEGPR_VARIANT_DIRS[variant]}/ folder found below it")
        base = root
    rows = []
    for path in _collect_images(base):
        m = FINEGPR_RE.match(path.name)
        if m is None:
            raise ValueError(f"{path}: file name does not match IIII_cCC_wWW_lLL_pPP.jpg")
        pid, *codes = (int(g) for g in m.groups())
        for (col, top), code in zip(FINEGPR_CODES.items(), codes):
            if not 1 <= code <= top:
                raise ValueError(f"{path}: {col} code {code} out of range (expected 1..{top})")
        rows.append((_rel(path, root), "train", pid, codes[0] - 1, *codes))
    return _frame(rows, ["image_id", "split", "pid", "camid", *FINEGPR_COLUMNS], dataset, base, root)


# ---------------------------------------------------------------------------------------------
# The user's own images: a folder with dataset.csv (path,pid,camid,split[,caption])
# ---------------------------------------------------------------------------------------------


def _csv_error(csv: Path, line: int, what: str) -> ValueError:
    """The one-line error of a bad CSV row: file, line (as an editor shows it), what is wrong."""
    return ValueError(f"{csv}:{line}: {what}")


def _read_csv(csv: Path) -> tuple[pd.DataFrame, list[int]]:
    """The CSV's rows (all str, stripped, blank lines dropped) and each row's line number.

    A row's line counts the header (line 1), blank lines and the line breaks inside quoted cells
    (a caption written over two lines), so it is the line an editor shows. The header is read as
    a row (``header=None``), so a row with more cells than the header is an error, never a
    silently dropped cell or a first column taken as the index.
    """
    try:
        raw = pd.read_csv(csv, header=None, dtype=str, keep_default_na=False, skip_blank_lines=False,
                          encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise ValueError(f"{csv}: empty file; the first line must be the header "
                         f"{','.join(CSV_COLUMNS)}[,caption]") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"{csv}: not a readable UTF-8 CSV ({str(exc).strip()})") from None
    raw = raw.apply(lambda col: col.str.strip())
    header = raw.iloc[0].tolist()
    missing = [c for c in CSV_COLUMNS if c not in header]
    unknown = [c for c in header if c not in (*CSV_COLUMNS, *CSV_OPTIONAL)]
    twice = sorted({c for c in header if header.count(c) > 1})
    if missing or unknown or twice:
        what = (f"missing column(s) {missing}" if missing else f"unknown column(s) {unknown}" if unknown
                else f"column(s) {twice} named twice")
        raise _csv_error(csv, 1, f"{what}; the header must name {', '.join(CSV_COLUMNS)} "
                                 f"(and optionally {', '.join(CSV_OPTIONAL)})")
    breaks = raw.apply(lambda col: col.str.count("\n")).sum(axis=1).cumsum().shift(fill_value=0)
    lines = (1 + pd.RangeIndex(len(raw)) + breaks.to_numpy()).tolist()[1:]
    df = raw.iloc[1:].reset_index(drop=True)
    df.columns = header
    keep = (df != "").any(axis=1).to_numpy()
    return df[keep].reset_index(drop=True), [n for n, k in zip(lines, keep) if k]


def _csv_image(csv: Path, line: int, value: str, folder: Path, real_folder: Path) -> tuple[str, Path]:
    """A row's ``path`` as a clean posix path relative to the CSV's folder, and the file it names.

    Refused: empty, absolute, with a backslash, leaving the folder (``..`` or a symlink whose
    target is outside, checked on the resolved path), or naming no file.
    """
    if not value:
        raise _csv_error(csv, line, "empty path")
    if "\\" in value:
        raise _csv_error(csv, line, f"path {value!r}: write folders with '/', not '\\'")
    rel = PurePosixPath(value)
    if rel.is_absolute() or ".." in rel.parts or re.match(r"^[A-Za-z]:", value):
        raise _csv_error(csv, line, f"path {value!r} is outside the folder {folder} (paths are relative "
                                    f"to the folder of {CSV_NAME}, without '..')")
    full = folder / rel
    real = full.resolve()
    if real_folder not in real.parents:
        raise _csv_error(csv, line, f"path {value!r} leads outside the folder {folder} (to {real})")
    if not real.is_file():
        raise _csv_error(csv, line, f"path {value!r}: image not found ({full})")
    return rel.as_posix(), full


def _csv_codes(values: list[str]) -> list[int]:
    """``pid`` / ``camid`` values as 0..n-1 in sorted order of the distinct values.

    When every value is a decimal integer they are compared as numbers ("7" and "007" are one
    id; 2 before 10), otherwise as strings. The same CSV always gives the same numbers.
    """
    if all(re.fullmatch(r"[+-]?\d+", v) for v in values):
        keys: list = [int(v) for v in values]
    else:
        keys = values
    code = {k: i for i, k in enumerate(sorted(set(keys)))}
    return [code[k] for k in keys]


def _check_decodes(csv: Path, files: list[Path], values: list[str], lines: list[int]) -> None:
    """Decode every image (the checks of verify_images); the first unreadable one, by line, raises."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for value, line, reason in zip(values, lines, pool.map(check_image, files)):
            if reason is not None:
                raise _csv_error(csv, line, f"path {value!r}: unreadable image ({reason})")


def _warn_unmatched_queries(csv: Path, df: pd.DataFrame, lines: list[int], pid_values: list[str]) -> None:
    gallery = set(df.loc[df["split"] == "gallery", "pid"])
    alone = [i for i in range(len(df)) if df["split"].iat[i] == "query" and df["pid"].iat[i] not in gallery]
    if alone:
        i = alone[0]
        log.warning("%s: %d query image(s) have an identity absent from the gallery (first: line %d, pid %r); "
                    "the evaluation does not count them", csv, len(alone), lines[i], pid_values[i])


def parse_csv(root: Path, dataset: str) -> pd.DataFrame:
    """The user's own images: ``dataset.csv`` (columns path,pid,camid,split[,caption]) in a folder.

    ``path`` is relative to the CSV's folder; ``pid``/``camid`` are integers or strings mapped to
    0..n-1 (:func:`_csv_codes`); an empty caption cell is null. Every row is checked, in line
    order (the path stays inside the folder, names a file and is not listed twice, the split is
    known, pid and camid are given), then every image is decoded; the first failure raises
    ValueError naming the CSV, the line and the value. A query identity absent from the gallery
    only warns.
    """
    found = []
    for path, dirnames, filenames in _walk_dirs(root):
        if CSV_NAME in filenames:
            found.append(path)
            dirnames[:] = []
    folder = _choose(found, root, dataset, f"{CSV_NAME} (columns {','.join(CSV_COLUMNS)}[,caption])")
    csv = folder / CSV_NAME
    rows, lines = _read_csv(csv)
    if rows.empty:
        raise ValueError(f"{csv}: no rows below the header (one row per image: {','.join(CSV_COLUMNS)})")
    real_folder, prefix = folder.resolve(), "" if folder == root else _rel(folder, root)
    image_ids, files, seen = [], [], {}
    for value, split, pid, camid, line in zip(rows["path"], rows["split"], rows["pid"], rows["camid"], lines):
        rel, full = _csv_image(csv, line, value, folder, real_folder)
        if rel in seen:
            raise _csv_error(csv, line, f"path {value!r} listed twice (first at line {seen[rel]})")
        if split not in SPLITS:
            raise _csv_error(csv, line, f"split {split!r} (path {value!r}) is not one of {', '.join(SPLITS)}")
        if not pid or not camid:
            raise _csv_error(csv, line, f"empty {'pid' if not pid else 'camid'} for path {value!r}")
        seen[rel] = line
        image_ids.append(f"{prefix}/{rel}" if prefix else rel)
        files.append(full)
    pids, camids = _csv_codes(rows["pid"].tolist()), _csv_codes(rows["camid"].tolist())
    _check_decodes(csv, files, rows["path"].tolist(), lines)
    columns = ["image_id", "split", "pid", "camid"]
    records = list(zip(image_ids, rows["split"], pids, camids))
    if "caption" in rows.columns and (rows["caption"] != "").any():
        columns.append("caption")
        records = [(*r, c or None) for r, c in zip(records, rows["caption"])]
    df = _frame(records, columns, dataset, folder, root)
    df.attrs[IMAGES_DECODED] = True  # verify_images need not decode them again
    order = {image_id: i for i, image_id in enumerate(image_ids)}
    at = [order[i] for i in df["image_id"]]
    _warn_unmatched_queries(csv, df, [lines[i] for i in at], [rows["pid"].iat[i] for i in at])
    return df


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

_PARSERS = {
    "finegpr": parse_finegpr,
    "market": parse_market,
    "cuhk03np": parse_cuhk03np,
    "msmt17": parse_msmt17,
    "randperson": parse_randperson,
    "cuhksysu": parse_cuhksysu,
    "csv": parse_csv,
}


def _registry_options(dataset: str, layout: str) -> dict:
    from dmf_core.data.sources.registry import REGISTRY

    entry = REGISTRY.get(dataset)
    if entry is None or entry.layout != layout:
        return {}
    return dict(entry.layout_options)


def parse_layout(layout: str, root: Path, dataset: str, **options) -> pd.DataFrame:
    """Manifest of ``root`` (= data/raw/<dataset>) read with the named layout parser.

    ``options`` go to the parser: ``variant`` (cuhk03np: "detected"|"labeled"; msmt17:
    "MSMT17_V1"|"MSMT17_V2"; finegpr: "full"|"subset"), ``combine_all`` (msmt17). When not
    given they come from the registry entry named ``dataset`` (if any), else from the name.
    """
    if layout not in _PARSERS:
        raise ValueError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    opts = {**_registry_options(dataset, layout), **options}
    parser = _PARSERS[layout]
    allowed = set(inspect.signature(parser).parameters) - {"root", "dataset"}
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise ValueError(f"layout {layout!r}: unknown option(s) {unknown} (allowed: {sorted(allowed)})")
    df = parser(root, dataset, **opts)
    counts = df.groupby("split").size().to_dict() if not df.empty else {}
    log.info("%s (%s layout, folder %s): %s", dataset, layout, df.attrs["folder"],
             ", ".join(f"{k} {v}" for k, v in counts.items()) or "empty")
    return df
