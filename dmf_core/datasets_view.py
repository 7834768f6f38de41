"""``dmf datasets``: every dataset this project knows, its state on this machine, and what to do next.

Datasets come from two places: the registry (:data:`dmf_core.data.sources.registry.REGISTRY`, real
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

A dataset that only passed the count check under ``allow_partial`` is marked so. The other files the
current params need are checked by :mod:`dmf_core.checks`.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from dmf_core import paths
from dmf_core.checks import attributes_requirement, human_size
from dmf_core.data.sources.fetch import read_lock, url_filename
from dmf_core.data.sources.manifest import ACCEPTED_PARTIAL


@dataclass
class DatasetStatus:
    name: str
    kind: str  # dataset | weights | file
    origin: str  # params | registry | params+registry
    source: str  # synth | url | archive | dir | registry (not configured); a file row: its path
    registry: str | None
    state: str
    size_bytes: int | None
    next_step: str
    how_to_get: str = ""
    partial: bool = False  # extracted, but it passed the count check only under allow_partial

    def as_dict(self) -> dict:
        return asdict(self)

    def shown_state(self) -> str:
        return f"{self.state} (allow_partial)" if self.partial else self.state


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


def _manifest_splits(manifest: Path) -> list[str] | None:
    import pyarrow.parquet as pq

    try:
        column = pq.read_table(manifest, columns=["split"]).column("split")
    except Exception:  # noqa: BLE001 - an unreadable manifest just is not "extracted"
        return None
    return sorted(set(column.to_pylist()))


def _accepted_partial(root: Path, name: str) -> bool:
    """Whether the download stage's statistics say the counts differed and allow_partial let it pass."""
    try:
        report = json.loads((root / paths.dataset_stats_json(name)).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("official_statistics") == ACCEPTED_PARTIAL


def _has_variant_folder(where: Path, variant: str) -> bool | None:
    """Whether a zip or folder holds ``<variant>/bounding_box_train/``; None when it cannot tell cheaply.

    A zip's member list is read from its central directory; a tar would have to be decompressed.
    """
    want = (variant.lower(), "bounding_box_train")
    if where.is_dir():
        return any(p.is_dir() for p in where.glob(f"**/{variant}/bounding_box_train"))
    if where.is_file() and zipfile.is_zipfile(where):
        with zipfile.ZipFile(where) as zf:
            for member in zf.namelist():
                parts = [p.lower() for p in member.split("/")]
                if any(parts[i:i + 2] == list(want) for i in range(len(parts) - 1)):
                    return True
        return False
    return None


def _missing_variant(entry, candidates: list[Path]) -> str | None:
    """The CUHK03-NP variant folder (``labeled/``) its registry entry needs, when the source lacks it."""
    variant = entry.layout_options.get("variant") if entry is not None and entry.layout == "cuhk03np" else None
    if variant is None:
        return None
    for where in candidates:
        if _has_variant_folder(where, variant) is False:
            return variant
    return None


def _archive_candidates(root: Path, name: str, spec, entry) -> list[Path]:
    out: list[Path] = []
    if spec is not None and spec.source == "archive" and spec.location:
        out.append(Path(spec.location))
    if spec is not None and spec.source == "url" and spec.location:

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


def _shown_path(path: Path, root: Path) -> Path:
    return path.relative_to(root) if path.is_relative_to(root) else path


def _weights_status(root: Path, name: str, entry, archives: list[Path], pretrained: str | None) -> DatasetStatus:
    """The registry's ViT weights, tied to ``model.image.pretrained`` when the params name a file."""
    configured = None
    if pretrained:
        configured = Path(pretrained) if Path(pretrained).is_absolute() else root / pretrained
    present = [p for p in ([configured] if configured is not None else []) + archives if p.is_file()]
    uses_it = configured is not None and configured.name in entry.archive_names
    how = " ".join(x for x in (f"{entry.title} ({entry.access}).", entry.note,
                               f"Licence: {entry.licence}." if entry.licence else "",
                               f"Put it at data/archives/{entry.default_archive()} and set "
                               "model.image.pretrained to that path.") if x)
    if configured is not None and configured.is_file():
        next_step = "ready (model.image.pretrained)"
    elif configured is not None:
        next_step = (f"model.image.pretrained: {pretrained} not found; download {entry.urls[0]} there"
                     if uses_it and entry.urls else f"model.image.pretrained: {pretrained} not found")
    elif present:
        next_step = f"set model.image.pretrained: {_shown_path(present[0], root)}"
    else:
        next_step = f"download it into data/archives/{entry.default_archive()} (`dmf datasets --verbose`)"
    return DatasetStatus(name=name, kind="weights", origin="params+registry" if uses_it else "registry",
                         source="archive" if uses_it else "registry", registry=entry.key,
                         state="present" if present else "missing",
                         size_bytes=present[0].stat().st_size if present else None, next_step=next_step,
                         how_to_get=how if not present else "")


def _status(root: Path, name: str, spec, entry, checksums: dict, origin: str) -> DatasetStatus:
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
    sources = archives + ([root / spec.location] if spec is not None and spec.source == "dir" and spec.location
                          else [])
    lacking = None if extracted else _missing_variant(entry, sources)

    how = entry.how_to_get() if entry is not None else ""
    if spec is None:
        layout = entry.layout if entry is not None else "?"
        where = archives[0] if archives else root / paths.ARCHIVES / (entry.default_archive() or f"{name}.zip")
        add = (f"add to params.yaml: datasets.{name}: {{layout: {layout}, source: archive, "
               f"registry: {name}, location: {_shown_path(where, root)}}}")
        next_step = add if archives else f"not here; `dmf datasets --verbose` says how to get it, then {add}"
    elif lacking:
        next_step = (f"{_shown_path(sources[0], root)} has no {lacking}/ folder (only other variants): "
                     f"download@{name} would refuse it; get the release that holds {lacking}/")
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
    return DatasetStatus(name=name, kind="dataset", origin=origin, source=source,
                         registry=entry.key if entry is not None else None, state=state, size_bytes=size,
                         next_step=next_step, how_to_get=how if state == "missing" or spec is None else "",
                         partial=extracted and _accepted_partial(root, name))


def _attributes_status(cfg, root: Path) -> DatasetStatus:
    need = attributes_requirement(cfg, root)
    path = cfg.captions.file
    full = root / path
    present = full.is_file()
    return DatasetStatus(name="captions.file",
                         kind="file", origin="params", source=path, registry=None,
                         state="present" if present else ("generated" if need.ok else "missing"),
                         size_bytes=full.stat().st_size if present else None,
                         next_step="ready" if present and need.ok else need.detail)


def collect(params: str | Path | None = "params.yaml", root: str | Path = ".") -> list[DatasetStatus]:
    """Every configured dataset (params order), the attribute file, then every other registry entry."""
    from dmf_core.config import load_config
    from dmf_core.data.sources.registry import REGISTRY

    root = Path(root)
    checksums = read_lock(root / paths.CHECKSUMS)
    cfg = load_config(root / params) if params is not None and (root / params).is_file() else None
    configured = cfg.datasets if cfg is not None else {}
    out: list[DatasetStatus] = []
    used_keys: set[str] = set()
    for name, spec in configured.items():
        key = spec.registry or (name if name in REGISTRY else None)
        entry = REGISTRY.get(key) if key else None
        if entry is not None:
            used_keys.add(entry.key)
        out.append(_status(root, name, spec, entry, checksums, "params+registry" if entry else "params"))
    if cfg is not None:
        out.append(_attributes_status(cfg, root))
    pretrained = cfg.model.image.pretrained if cfg is not None else None
    for key, entry in REGISTRY.items():
        if key in used_keys or key in configured:
            continue
        archives = [p for p in _archive_candidates(root, key, None, entry) if p.is_file()]
        out.append(_weights_status(root, key, entry, archives, pretrained) if entry.kind == "weights"
                   else _status(root, key, None, entry, checksums, "registry"))
    return out


def format_table(rows: list[DatasetStatus], verbose: bool = False) -> str:
    """A plain-text table, then how to get each dataset that is missing (all of them with ``verbose``)."""
    header = ("dataset", "kind", "in", "state", "size", "next")
    table = [header] + [(r.name, r.kind, r.origin, r.shown_state(), human_size(r.size_bytes), r.next_step)
                        for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]
    lines = ["  ".join(f"{str(cell):<{w}}" for cell, w in zip(row[:-1], widths)) + "  " + str(row[-1])
             for row in table]
    notes = [r for r in rows if r.how_to_get and (verbose or (r.state == "missing" and r.origin != "registry"))]
    if notes:
        lines += ["", "How to get them:"]
        lines += [f"- {r.name}: {r.how_to_get}" for r in notes]
    if any(r.partial for r in rows):
        lines += ["", "(allow_partial): the extracted copy differs from the official counts and was accepted "
                      "because the dataset sets allow_partial: true"]
    return "\n".join(lines)
