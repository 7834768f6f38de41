"""``dmf datasets``: every dataset this project knows, its state on this machine, and what to do next.

Datasets come from two places: the registry (:data:`dmf_core.data.registry.REGISTRY`, real
datasets and weights with their archive names and how to get them) and ``params.yaml``
(``datasets:``, including the SynthPed domains). A configured dataset that names a registry key
(``datasets.<name>.registry``) is shown once, under its params name.

States, from least to most ready:

- ``missing``: nothing here;
- ``archive present``: the archive is on disk (``data/archives/`` or the configured location);
- ``verified``: its sha256 is recorded in ``data/checksums.json`` for this dataset and the file
  still has the recorded size;
- ``extracted``: ``data/raw/<name>/`` and its manifest exist (``download@<name>`` has run);
- ``packed``: every split of the manifest has its LMDB under ``data/lmdb/<name>/``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from dmf_core import paths

STATES = ("missing", "archive present", "verified", "extracted", "packed")


@dataclass
class DatasetStatus:
    name: str
    kind: str  # dataset | weights
    origin: str  # params | registry | params+registry
    source: str  # synth | url | archive | dir | registry (not configured)
    registry: str | None
    state: str
    size_bytes: int | None
    next_step: str
    how_to_get: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def tree_size(path: Path) -> int:
    """Bytes of all files below ``path`` (symlinks not followed)."""
    total = 0
    stack = [Path(path)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def _read_checksums(root: Path) -> dict:
    path = root / paths.CHECKSUMS
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); fix or delete it") from None
    return data if isinstance(data, dict) else {}


def _manifest_splits(manifest: Path) -> list[str] | None:
    import pyarrow.parquet as pq

    try:
        column = pq.read_table(manifest, columns=["split"]).column("split")
    except Exception:  # noqa: BLE001 - an unreadable manifest just is not "extracted"
        return None
    return sorted(set(column.to_pylist()))


def _archive_candidates(root: Path, name: str, spec, entry) -> list[Path]:
    out: list[Path] = []
    if spec is not None and spec.source == "archive" and spec.location:
        out.append(Path(spec.location))
    if spec is not None and spec.source == "url" and spec.location:
        from dmf_core.data.fetch import url_filename

        fname = url_filename(spec.location)
        if fname:
            out.append(paths.ARCHIVES / fname)
    if entry is not None:
        out.extend(paths.ARCHIVES / n for n in entry.archive_names)
    seen, unique = set(), []
    for p in out:
        full = p if p.is_absolute() else root / p
        if full not in seen:
            seen.add(full)
            unique.append(full)
    return unique


def _status(root: Path, name: str, spec, entry, checksums: dict, origin: str) -> DatasetStatus:
    kind = entry.kind if entry is not None else "dataset"
    source = spec.source if spec is not None else "registry"
    archives = [p for p in _archive_candidates(root, name, spec, entry) if p.is_file()]
    record = checksums.get(name) if spec is not None else None
    verified = False
    if record and record.get("sha256"):
        verified = any(p.name == record.get("file") and p.stat().st_size == record.get("size") for p in archives)
    raw, manifest, lmdb_dir = root / paths.raw_dir(name), root / paths.manifest_path(name), root / paths.lmdb_dir(name)
    extracted = spec is not None and raw.is_dir() and manifest.is_file()
    splits = _manifest_splits(manifest) if extracted else None
    packed = bool(extracted and splits and all((root / paths.lmdb_path(name, s)).is_file() for s in splits))

    if packed:
        state, size = "packed", tree_size(lmdb_dir)
    elif extracted:
        state, size = "extracted", tree_size(raw)
    elif verified:
        state, size = "verified", archives[0].stat().st_size
    elif archives:
        state, size = "archive present", archives[0].stat().st_size
    else:
        state, size = "missing", None

    how = entry.how_to_get() if entry is not None else ""
    if kind == "weights":
        how = " ".join(x for x in (f"{entry.title} ({entry.access}).", entry.note,
                                   f"Licence: {entry.licence}." if entry.licence else "",
                                   f"Put it at data/archives/{entry.default_archive()} and set "
                                   "model.image.pretrained to that path.") if x)
    if kind == "weights":
        if archives:
            next_step = f"set model.image.pretrained: {archives[0].relative_to(root) if archives[0].is_relative_to(root) else archives[0]}"
        elif entry is not None and entry.urls:
            next_step = f"download it into data/archives/{entry.default_archive()} (`dmf datasets --verbose`)"
        else:
            next_step = "see below"
        state = "archive present" if archives else "missing"
    elif spec is None:
        layout = entry.layout if entry is not None else "?"
        where = archives[0] if archives else root / paths.ARCHIVES / (entry.default_archive() or f"{name}.zip")
        rel = where.relative_to(root) if where.is_relative_to(root) else where
        add = (f"add to params.yaml: datasets.{name}: {{layout: {layout}, source: archive, "
               f"registry: {name}, location: {rel}}}")
        next_step = add if archives else f"not here; `dmf datasets --verbose` says how to get it, then {add}"
    elif state == "packed":
        next_step = "ready"
    elif state == "extracted":
        next_step = f"dvc repro pack@{name}"
    elif state in ("verified", "archive present"):
        next_step = f"dvc repro download@{name}  (verifies, extracts, writes the manifest)"
    elif spec.source == "synth":
        next_step = f"dvc repro download@{name}  (renders it)"
    elif spec.source == "url":
        next_step = f"dvc repro download@{name}  (downloads {spec.location})"
    elif spec.source == "dir":
        next_step = (f"put the extracted dataset at {spec.location}, then dvc repro download@{name}"
                     if not Path(spec.location).is_dir() else f"dvc repro download@{name}")
    else:
        next_step = f"put the archive at {spec.location} (see below), then dvc repro download@{name}"
    return DatasetStatus(name=name, kind=kind, origin=origin, source=source,
                         registry=entry.key if entry is not None else None, state=state, size_bytes=size,
                         next_step=next_step, how_to_get=how if state in ("missing",) or spec is None else "")


def collect(params: str | Path | None = "params.yaml", root: str | Path = ".") -> list[DatasetStatus]:
    """Status of every configured dataset (params order), then every other registry entry."""
    from dmf_core.config import load_config
    from dmf_core.data.registry import REGISTRY

    root = Path(root)
    checksums = _read_checksums(root)
    configured = {}
    if params is not None and (root / params).is_file():
        configured = load_config(root / params).datasets
    out: list[DatasetStatus] = []
    used_keys: set[str] = set()
    for name, spec in configured.items():
        key = spec.registry or (name if name in REGISTRY else None)
        entry = REGISTRY.get(key) if key else None
        if entry is not None:
            used_keys.add(entry.key)
        out.append(_status(root, name, spec, entry, checksums, "params+registry" if entry else "params"))
    for key, entry in REGISTRY.items():
        if key not in used_keys and key not in configured:
            out.append(_status(root, key, None, entry, checksums, "registry"))
    return out


def format_table(rows: list[DatasetStatus], verbose: bool = False) -> str:
    """A plain-text table, then how to get each dataset that is missing (all of them with ``verbose``)."""
    header = ("dataset", "kind", "in", "state", "size", "next")
    table = [header] + [(r.name, r.kind, r.origin, r.state, human_size(r.size_bytes), r.next_step) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]
    lines = ["  ".join(f"{str(cell):<{w}}" for cell, w in zip(row[:-1], widths)) + "  " + str(row[-1])
             for row in table]
    notes = [r for r in rows if r.how_to_get and (verbose or (r.state == "missing" and r.origin != "registry"))]
    if notes:
        lines += ["", "How to get them:"]
        lines += [f"- {r.name}: {r.how_to_get}" for r in notes]
    return "\n".join(lines)
