"""Captions people wrote: a manifest's ``caption`` column and the published caption JSON files.

Each reader returns the caption table of :mod:`dmf_core.data.captions.generate` (``image_id``,
``caption_idx`` int16, ``caption``; sorted), ready for :func:`~dmf_core.data.captions.generate.write_captions`,
with ``frame.attrs["skipped"]`` (counts of what was left out) and ``frame.attrs["entries"]``
(the JSON's entries per split). Formats (FACTS §8.3; IRRA ``datasets/*.py``), each a JSON list
of objects:

- CUHK-PEDES ``reid_raw.json``: ``id``, ``file_path`` (relative to ``imgs/``), ``captions`` (list),
  ``split`` (train / val / test), ``processed_tokens``;
- ICFG-PEDES ``ICFG-PEDES.json`` / ``ICFG_PEDES.json``: the same keys (train / test);
- RSTPReid ``data_captions.json``: ``id``, ``img_path``, ``captions`` (list), ``split``.

The image paths are untrusted: an absolute one, one with ``..`` (or a backslash, a NUL) or one
that resolves (through a link) outside the image folder stops the read, naming the file, the
entry and the value. Images absent from the manifest and empty captions stop it too unless
``on_bad_rows == "skip"`` (then they are dropped, counted and logged with examples).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from dmf_core.data.captions.generate import CaptionInputError

log = logging.getLogger(__name__)

_MAX_LISTED = 5
_DRIVE = re.compile(r"^[A-Za-z]:")

#: source name -> (what the file is, the key holding an entry's image path)
FORMATS: dict[str, tuple[str, str]] = {
    "cuhk_pedes": ("CUHK-PEDES reid_raw.json", "file_path"),
    "icfg_pedes": ("ICFG-PEDES ICFG-PEDES.json", "file_path"),
    "rstpreid": ("RSTPReid data_captions.json", "img_path"),
}


def read_cuhk_pedes(json_path: Path, manifest: pd.DataFrame, **kw: Any) -> pd.DataFrame:
    """CUHK-PEDES ``reid_raw.json`` (``file_path``, ``captions``) as a caption table."""
    return read_published("cuhk_pedes", json_path, manifest, **kw)


def read_icfg_pedes(json_path: Path, manifest: pd.DataFrame, **kw: Any) -> pd.DataFrame:
    """ICFG-PEDES ``ICFG-PEDES.json`` / ``ICFG_PEDES.json`` (keys as CUHK-PEDES) as a caption table."""
    return read_published("icfg_pedes", json_path, manifest, **kw)


def read_rstpreid(json_path: Path, manifest: pd.DataFrame, **kw: Any) -> pd.DataFrame:
    """RSTPReid ``data_captions.json`` (``img_path``, ``captions``) as a caption table."""
    return read_published("rstpreid", json_path, manifest, **kw)


def read_published(source: str, json_path: Path, manifest: pd.DataFrame, *, images: str | None = None,
                   raw_dir: Path | None = None, on_bad_rows: str = "fail") -> pd.DataFrame:
    """The caption table of a published caption JSON (``source``: a key of :data:`FORMATS`).

    An entry's image id is ``images/<path>`` (``images``: the folder under the dataset's
    ``raw_dir`` the JSON's paths start in, e.g. ``imgs``; None: ``raw_dir`` itself), matched
    exactly against the manifest's ``image_id``. With ``raw_dir`` given, a path that resolves
    outside that folder through a link is refused too. Captions of one image keep the JSON's
    order (entries listing the same image are joined).
    """
    if source not in FORMATS:
        raise ValueError(f"unknown caption format {source!r}; expected one of {sorted(FORMATS)}")
    json_path = Path(json_path)
    what, path_key = FORMATS[source]
    entries = _load_entries(json_path, what)
    folder = _image_folder(images, json_path)
    root = (Path(raw_dir) / folder) if raw_dir is not None else None
    real_root = os.path.realpath(root) if root is not None and root.is_dir() else None
    rows, splits = [], Counter()
    for i, entry in enumerate(entries):
        image, captions, split = _entry(json_path, i, entry, path_key)
        rel = _safe_path(json_path, i, path_key, image, real_root)
        splits[split] += 1
        image_id = f"{folder}/{rel}" if folder else rel
        rows.extend((image_id, i, k, text) for k, text in enumerate(captions))
    table = pd.DataFrame(rows, columns=["image_id", "entry", "order", "caption"])
    out = _match_manifest(json_path, table, manifest, on_bad_rows)
    out.attrs["entries"] = dict(sorted(splits.items()))
    return out


def read_manifest_captions(manifest: pd.DataFrame, *, where: str = "manifest",
                           on_bad_rows: str = "fail") -> pd.DataFrame:
    """The caption table of a manifest's ``caption`` column (layout csv: one caption per image).

    Rows whose caption is empty or missing are images without a caption (logged and counted);
    no caption at all stops the read.
    """
    if "caption" not in manifest.columns:
        raise CaptionInputError(f"{where}: no 'caption' column (captions.source: manifest reads the caption "
                                "column of a layout csv dataset: path,pid,camid,split,caption)")
    text = manifest["caption"].astype("string").str.strip()
    table = pd.DataFrame({"image_id": manifest["image_id"].astype(str).to_numpy(),
                          "entry": range(len(manifest)), "order": 0,
                          "caption": text.fillna("").to_numpy(dtype=object)})
    table = table[table["caption"] != ""]
    return _match_manifest(Path(where), table, manifest, on_bad_rows, empty_is_bad=False)


def read_caption_source(captions, manifest: pd.DataFrame, *, manifest_path: Path, raw_dir: Path) -> pd.DataFrame:
    """The caption table of a ``captions.source`` that reads captions people wrote (every source but
    ``attributes``): FineGPR-C's released JSON, the manifest's ``caption`` column, or a published
    JSON file. ``captions`` is the ``captions`` section of the config."""
    from dmf_core.data.captions.generate import read_finegpr_c

    if captions.source == "finegpr_c":
        return read_finegpr_c(Path(captions.file), manifest, on_bad_rows=captions.on_bad_rows)
    if captions.source == "manifest":
        if Path(captions.file) != Path(manifest_path):
            raise CaptionInputError(f"captions.file: {captions.file!r}; with captions.source: manifest it names "
                                    f"the manifest the captions come from, {manifest_path}")
        return read_manifest_captions(manifest, where=str(manifest_path), on_bad_rows=captions.on_bad_rows)
    return read_published(captions.source, Path(captions.file), manifest, images=captions.images,
                          raw_dir=raw_dir, on_bad_rows=captions.on_bad_rows)


def _load_entries(json_path: Path, what: str) -> list:
    try:
        data = json.loads(json_path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise CaptionInputError(f"{json_path}: caption file not found ({what}; captions.file)") from None
    except json.JSONDecodeError as exc:
        raise CaptionInputError(f"{json_path}: not valid JSON ({exc})") from None
    except UnicodeDecodeError as exc:
        raise CaptionInputError(f"{json_path}: not UTF-8 text ({exc})") from None
    if not isinstance(data, list) or not data:
        kind = type(data).__name__ if not isinstance(data, list) else "an empty list"
        raise CaptionInputError(f"{json_path}: expected a non-empty list of entries ({what}), got {kind}")
    return data


def _image_folder(images: str | None, json_path: Path) -> str:
    """``captions.images`` as a clean relative folder ('' for the dataset folder itself)."""
    if not images:
        return ""
    bad = _path_problem(str(images))
    if bad:
        raise CaptionInputError(f"captions.images {images!r} (for {json_path}): {bad}; expected a folder "
                                "relative to data/raw/<dataset>/")
    return "/".join(p for p in str(images).split("/") if p not in ("", "."))


def _entry(json_path: Path, i: int, entry: Any, path_key: str) -> tuple[Any, list[str], str]:
    """(image path, captions, split) of entry ``i``; a malformed entry stops the read."""
    if not isinstance(entry, dict):
        raise CaptionInputError(f"{json_path}: entry {i}: expected an object, got {type(entry).__name__}")
    missing = [k for k in (path_key, "captions") if k not in entry]
    if missing:
        raise CaptionInputError(f"{json_path}: entry {i}: lacks key(s) {missing} (has {sorted(entry)[:8]})")
    captions = entry["captions"]
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise CaptionInputError(f"{json_path}: entry {i}: 'captions' must be a list of strings, "
                                f"got {str(captions)[:80]!r}")
    return entry[path_key], [c.strip() for c in captions], str(entry.get("split", ""))


def _path_problem(value: str) -> str | None:
    """Why ``value`` is not a safe relative posix path, or None."""
    if not value.strip():
        return "an empty path"
    if "\x00" in value or "\\" in value:
        return "a path with a backslash or NUL"
    if value.startswith("/") or _DRIVE.match(value):
        return "an absolute path"
    if ".." in value.split("/"):
        return "a path with '..'"
    return None


def _safe_path(json_path: Path, i: int, key: str, value: Any, real_root: str | None) -> str:
    """The entry's image path, normalised; a hostile one stops the read with one line."""
    bad = "not a string" if not isinstance(value, str) else _path_problem(value)
    rel = "" if bad else "/".join(p for p in value.split("/") if p not in ("", "."))
    if not bad and real_root is not None:
        if not os.path.realpath(os.path.join(real_root, rel)).startswith(real_root + os.sep):
            bad = f"a path that resolves outside {real_root}"
    if bad:
        raise CaptionInputError(f"{json_path}: entry {i}: {key} {value!r} is {bad}; refused (image paths "
                                "must be relative to the image folder and stay inside it)")
    return rel


def _match_manifest(source: Path, table: pd.DataFrame, manifest: pd.DataFrame, on_bad_rows: str,
                    *, empty_is_bad: bool = True) -> pd.DataFrame:
    """Drop (skip) or refuse (fail) captions of unknown images and empty captions; number the rest."""
    if on_bad_rows not in ("fail", "skip"):
        raise ValueError(f"captions.on_bad_rows: expected 'fail' or 'skip', got {on_bad_rows!r}")
    known = set(manifest["image_id"].astype(str))
    unknown = ~table["image_id"].isin(known).to_numpy()
    empty = (table["caption"] == "").to_numpy() & ~unknown
    problems = []
    if unknown.any():
        names = table.loc[unknown, "image_id"].drop_duplicates()
        problems.append(f"{len(names)} image(s) not in the manifest, e.g. {names.head(_MAX_LISTED).tolist()}")
    if empty.any() and empty_is_bad:
        where = table.loc[empty, "entry"].drop_duplicates().head(_MAX_LISTED).tolist()
        problems.append(f"{int(empty.sum())} empty caption(s), e.g. in entries {where}")
    if problems:
        message = f"{source}: " + " | ".join(problems)
        if on_bad_rows == "fail":
            raise CaptionInputError(message + " (set captions.on_bad_rows: skip to drop and count them)")
        log.warning("%s; skipping", message)
    skipped = {"images_not_in_manifest": int(table.loc[unknown, "image_id"].nunique()),
               "captions_of_images_not_in_manifest": int(unknown.sum()), "captions_empty": int(empty.sum())}
    table = table[~unknown & ~empty].sort_values(["image_id", "entry", "order"], kind="stable")
    if not len(table):
        raise CaptionInputError(f"{source}: no caption left for any manifest image")
    out = pd.DataFrame({"image_id": table["image_id"].to_numpy(dtype=object),
                        "caption_idx": table.groupby("image_id", sort=False).cumcount().astype("int16").to_numpy(),
                        "caption": table["caption"].to_numpy(dtype=object)})
    without = len(known - set(out["image_id"]))
    if without:
        log.warning("%s: %d manifest image(s) have no caption", source, without)
    skipped["manifest_images_without_caption"] = without
    out.attrs["skipped"] = skipped
    return out
