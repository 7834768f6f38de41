"""FineGPR identity-level attribute file: schema, header aliases and a strict reader.

The official FineGPR attribute annotation format is not documented (FACTS §4.3), so the reader
accepts delimited text (CSV, TSV, ``;`` or ``|`` separated; UTF-8 with or without BOM; LF or
CRLF line ends) with one header row. Columns are matched to the canonical names ``pid`` +
:data:`ATTRIBUTE_COLUMNS` through :data:`HEADER_ALIASES` after normalising a header (lower case,
every run of non-alphanumerics -> ``_``). Codes are FineGPR's (``01``/``1`` ...); the meaning
words of :data:`ATTRIBUTE_CODES` (``male``, ``yes``, ``brown`` ...) are accepted as well.

No torch import here: the captions stage must start fast.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

ATTRIBUTE_COLUMNS: tuple[str, ...] = (
    "gender", "hair", "age", "glasses", "short_sleeve", "top_length", "dress", "boots", "hat", "bag",
    "shoe_color", "upper_color", "lower_color",
)

_YES_NO = {1: "yes", 2: "no"}
COLOURS: dict[int, str] = {1: "black", 2: "white", 3: "red", 4: "purple", 5: "gray", 6: "yellow", 7: "blue",
                           8: "green", 9: "brown"}

#: code -> meaning for each attribute (FACTS §4.3, FineGPR README).
ATTRIBUTE_CODES: dict[str, dict[int, str]] = {
    "gender": {1: "male", 2: "female"},
    "hair": {1: "long", 2: "short"},
    "age": {1: "teenager", 2: "adult", 3: "older"},
    "glasses": dict(_YES_NO),
    "short_sleeve": dict(_YES_NO),
    "top_length": {1: "long", 2: "short"},
    "dress": dict(_YES_NO),
    "boots": dict(_YES_NO),
    "hat": dict(_YES_NO),
    "bag": dict(_YES_NO),
    "shoe_color": {1: "dark", 2: "light"},
    "upper_color": dict(COLOURS),
    "lower_color": dict(COLOURS),
}


def _norm(header: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", header.strip().lower()).strip("_")


_ALIASES_RAW: dict[str, tuple[str, ...]] = {
    "pid": ("pid", "id", "person_id", "personid", "person", "identity", "identity_id", "ID", "p_id"),
    "gender": ("gender", "sex"),
    "hair": ("hair", "hair length", "hair_length", "Hair length", "length of hair"),
    "age": ("age", "age group", "age_group"),
    "glasses": ("glasses", "glass", "Wear glass", "wear_glass", "wear glasses", "wear_glasses", "eyeglasses"),
    "short_sleeve": ("short_sleeve", "short sleeve", "Wear short sleeve", "wear_short_sleeve", "short_sleeves",
                     "sleeve", "sleeves"),
    "top_length": ("top_length", "top length", "Length of top clothes", "length_of_top_clothes", "length of top",
                   "top_clothes_length", "upper_length"),
    "dress": ("dress", "Wear dress", "wear_dress", "skirt_dress"),
    "boots": ("boots", "boot", "Wear boot", "wear_boot", "wear boots", "wear_boots"),
    "hat": ("hat", "Wear hat", "wear_hat", "cap"),
    "bag": ("bag", "Carry bag", "carry_bag", "carry a bag", "bags", "backpack"),
    "shoe_color": ("shoe_color", "shoe colour", "shoe_colour", "shoes_color", "shoes colour", "Color of shoes",
                   "Colour of shoes", "color of shoe", "shoes"),
    "upper_color": ("upper_color", "upper colour", "upper_colour", "Color of upper-body clothes",
                    "Colour of upper-body clothes", "upper body color", "upper_body_color", "upper_body_colour",
                    "top_color", "top_colour", "up_color"),
    "lower_color": ("lower_color", "lower colour", "lower_colour", "Color of lower-body clothes",
                    "Colour of lower-body clothes", "lower body color", "lower_body_color", "lower_body_colour",
                    "bottom_color", "bottom_colour", "down_color"),
}

#: normalised header spelling -> canonical column name (documented in docs/captions.md).
HEADER_ALIASES: dict[str, str] = {_norm(alias): canon for canon, aliases in _ALIASES_RAW.items() for alias in aliases}

_DELIMITERS = ("\t", ",", ";", "|")
_MAX_LISTED = 5


class AttributeFileError(ValueError):
    """The attribute file does not fit the documented format; the message says where and how."""


def missing_file_message(path: Path | str) -> str:
    """What the attribute file is, its format and where it goes: for a file that is not there."""
    return (f"{path}: FineGPR attribute file not found (captions.file, source attributes). It is a delimited text file "
            f"with a header row and one row per identity: pid,{','.join(ATTRIBUTE_COLUMNS)}, each cell a "
            "FineGPR code (e.g. 0001,01,02,02,02,02,01,02,01,02,02,01,09,05; gender 01 male / 02 female, "
            "colours 01-09 black..brown; every code and accepted header spelling: docs/captions.md). "
            "FineGPR's own attribute annotation is not in this format: convert it, save it at this path "
            "(the paper profile's is data/archives/FineGPR_attributes.csv, outside data/raw/ which DVC "
            "deletes) or point captions.file at your converted file")


def canonical_column(header: str) -> str | None:
    """The canonical column name for a header spelling, or None when it is not known."""
    return HEADER_ALIASES.get(_norm(header))


def _sniff_delimiter(header_line: str, path: Path) -> str:
    counts = {d: header_line.count(d) for d in _DELIMITERS}
    best = max(_DELIMITERS, key=lambda d: counts[d])
    if counts[best] == 0:
        raise AttributeFileError(
            f"{path}: cannot tell the delimiter from the header line {header_line[:120]!r}: expected a tab-, "
            f"comma-, semicolon- or |-separated header with columns pid + {', '.join(ATTRIBUTE_COLUMNS)}")
    return best


def _parse_codes(values: pd.Series, column: str) -> pd.Series:
    """Strings -> integer codes (NaN where the value is not a known code or meaning word)."""
    allowed = ATTRIBUTE_CODES[column]
    words = {meaning: code for code, meaning in allowed.items()}
    if column in ("upper_color", "lower_color"):
        words["grey"] = 5
    if column == "age":
        words["teenage"] = 1
        words["old"] = 3
        words["elderly"] = 3
    low = values.str.strip().str.lower()
    num = pd.to_numeric(low.where(low.str.fullmatch(r"\d+(\.0+)?")), errors="coerce")
    by_word = low.map(words)
    out = num.where(num.notna(), by_word)
    return out.where(out.isin(list(allowed)))


def read_attributes(path: Path | str, *, on_bad_rows: str = "fail") -> pd.DataFrame:
    """Read and validate a FineGPR attribute file.

    Returns a frame with ``pid`` (int64) + :data:`ATTRIBUTE_COLUMNS` (int8 FineGPR codes), one row per
    identity, sorted by pid. Rows with an unparseable pid, an unknown code, or a conflicting
    duplicate pid stop the read with :class:`AttributeFileError` (first rows listed + count);
    with ``on_bad_rows="skip"`` they are dropped and counted in ``frame.attrs["skipped"]``
    (``{"attribute_rows_bad": n}``). Exact duplicate rows are collapsed silently.
    """
    if on_bad_rows not in ("fail", "skip"):
        raise ValueError(f"on_bad_rows: expected 'fail' or 'skip', got {on_bad_rows!r}")
    path = Path(path)
    frame, header_line = _read_table(path)
    mapping = _column_mapping(frame, path)
    frame = frame[list(mapping)].rename(columns=mapping)
    line_no = np.arange(len(frame)) + header_line + 2  # 1-based file line of each data row
    problems: list[str] = []
    result, bad = _parse_cells(frame, line_no, problems)
    n_exact = _mark_duplicate_pids(result, bad, frame, line_no, problems)
    n_bad = int(bad.sum()) - n_exact
    if problems:
        message = f"{path}: {n_bad} bad row(s) of {len(frame)}: " + "; ".join(problems)
        if on_bad_rows == "fail":
            raise AttributeFileError(message + " (set captions.on_bad_rows: skip to drop them)")
        log.warning("%s; skipping them", message)
    result = result[~bad].astype({"pid": "int64", **{c: "int8" for c in ATTRIBUTE_COLUMNS}})
    result = result.sort_values("pid", kind="stable").reset_index(drop=True)
    result.attrs["skipped"] = {"attribute_rows_bad": n_bad}
    result.attrs["source"] = str(path)
    return result


def _read_table(path: Path) -> tuple[pd.DataFrame, int]:
    """Every cell as text, and the index of the header line (blank lines before it are skipped)."""
    if not path.is_file():
        raise FileNotFoundError(missing_file_message(path))
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AttributeFileError(f"{path}: not UTF-8 text ({exc})") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise AttributeFileError(f"{path}: empty file; expected a header row pid,{','.join(ATTRIBUTE_COLUMNS)}")
    sep = _sniff_delimiter(lines[first], path)
    try:
        frame = pd.read_csv(io.StringIO("\n".join(lines[first:])), sep=sep, dtype=str, keep_default_na=False,
                            skip_blank_lines=True, engine="python" if len(sep) > 1 else "c")
    except pd.errors.ParserError as exc:  # reliability (issue 9): a ragged row names the file, not just pandas
        raise AttributeFileError(f"{path}: rows do not all have the header's {lines[first].count(sep) + 1} "
                                 f"cells ({exc}; line numbers count from the header)") from None
    return frame, first


def _column_mapping(frame: pd.DataFrame, path: Path) -> dict[str, str]:
    """File header -> canonical column, for every header :data:`HEADER_ALIASES` knows (others are
    logged and ignored); every canonical column must be there, once."""
    mapping: dict[str, str] = {}
    unknown: list[str] = []
    for col in frame.columns:
        canon = canonical_column(str(col))
        if canon is None:
            unknown.append(str(col))
            continue
        if canon in mapping.values():
            other = next(k for k, v in mapping.items() if v == canon)
            raise AttributeFileError(f"{path}: columns {other!r} and {col!r} both map to {canon!r}; keep one")
        mapping[str(col)] = canon
    missing = [c for c in ("pid", *ATTRIBUTE_COLUMNS) if c not in mapping.values()]
    if missing:
        raise AttributeFileError(
            f"{path}: missing column(s) {', '.join(missing)}; found header {list(map(str, frame.columns))} "
            f"(unrecognised: {unknown}); see HEADER_ALIASES / docs/captions.md for accepted spellings")
    if unknown:
        log.warning("%s: ignoring unrecognised column(s) %s", path, unknown)
    return mapping


def _parse_cells(frame: pd.DataFrame, line_no: np.ndarray,
                 problems: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """pid and codes as numbers (NaN where unreadable) and the mask of rows with an unreadable cell,
    each bad column described in ``problems``."""
    bad = np.zeros(len(frame), dtype=bool)
    pid_text = frame["pid"].str.strip()
    pid = pd.to_numeric(pid_text.where(pid_text.str.fullmatch(r"\d+")), errors="coerce")
    bad_pid = pid.isna().to_numpy()
    if bad_pid.any():
        rows = np.flatnonzero(bad_pid)
        listed = ", ".join(f"line {line_no[r]} pid={frame['pid'].iat[r]!r}" for r in rows[:_MAX_LISTED])
        problems.append(f"column 'pid': {len(rows)} row(s) without a non-negative integer id ({listed})")
        bad |= bad_pid
    out = {"pid": pid}
    for col in ATTRIBUTE_COLUMNS:
        codes = _parse_codes(frame[col], col)
        bad_col = codes.isna().to_numpy()
        if bad_col.any():
            rows = np.flatnonzero(bad_col)
            expected = ", ".join(f"{k:02d}={v}" for k, v in ATTRIBUTE_CODES[col].items())
            listed = ", ".join(f"line {line_no[r]} pid={frame['pid'].iat[r]!r} {col}={frame[col].iat[r]!r}"
                               for r in rows[:_MAX_LISTED])
            problems.append(f"column {col!r}: {len(rows)} row(s) with unknown code (expected {expected}): {listed}")
            bad |= bad_col
        out[col] = codes
    return pd.DataFrame(out), bad


def _mark_duplicate_pids(result: pd.DataFrame, bad: np.ndarray, frame: pd.DataFrame, line_no: np.ndarray,
                         problems: list[str]) -> int:
    """Mark in ``bad`` every row of a pid listed with different attributes (a problem) and every
    repeat of an identical row (collapsed quietly); returns how many identical repeats there were."""
    good = result[~bad]
    dup_any = good.duplicated("pid", keep=False)
    if not dup_any.any():
        return 0
    exact = good.duplicated(keep="first")
    conflicting = good[dup_any & ~good.duplicated(keep=False)]
    if len(conflicting):
        cpids = sorted(set(conflicting["pid"].astype("int64")))
        idx = good.index[good["pid"].isin(cpids)].to_numpy()
        listed = ", ".join(f"line {line_no[r]} pid={frame['pid'].iat[r]!r}" for r in idx[:_MAX_LISTED])
        problems.append(f"column 'pid': {len(cpids)} id(s) listed more than once with different attributes "
                        f"({listed})")
        bad[idx] = True
    bad[good.index[exact.to_numpy()].to_numpy()] = True
    return int(exact.sum())


def validate_attribute_frame(attributes: pd.DataFrame) -> pd.Series:
    """Boolean mask of rows whose codes are all known (for frames not made by :func:`read_attributes`)."""
    missing = [c for c in ("pid", *ATTRIBUTE_COLUMNS) if c not in attributes.columns]
    if missing:
        raise AttributeFileError(f"attribute frame: missing column(s) {', '.join(missing)}")
    ok = pd.Series(True, index=attributes.index)
    for col in ATTRIBUTE_COLUMNS:
        ok &= attributes[col].isin(list(ATTRIBUTE_CODES[col]))
    return ok


def write_attributes(attributes: pd.DataFrame, path: Path | str) -> None:
    """Write the canonical format: header pid + ATTRIBUTE_COLUMNS, pid 4-digit, codes 2-digit."""
    out = pd.DataFrame({"pid": attributes["pid"].map(lambda p: f"{int(p):04d}")})
    for col in ATTRIBUTE_COLUMNS:
        out[col] = attributes[col].map(lambda c: f"{int(c):02d}")
    Path(path).write_text(out.to_csv(index=False, lineterminator="\n"))
