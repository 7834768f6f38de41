"""Model files: safetensors + config.json + meta.json, behind ``DMFModel.save_pretrained`` /
``DMFModel.from_pretrained``.

- ``save_model`` / ``load_model``: the training stages' outputs, ``model.safetensors`` (the weights),
  ``config.json`` (what rebuilds the architecture, Hugging Face style: taken from the model's own
  constructor arguments, :meth:`DMFModel.config`, never from params.yaml keys, so that renaming a
  params key never breaks loading) and ``meta.json`` (provenance: the pipeline config, number of
  classes, params hash, library versions). Loading needs only the first two; a model written
  before config.json existed loads from meta.json's pipeline config. No pickles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dmf_core.config import Config, config_from_dict, to_dict

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"
FORMAT = "dmf-model/1"
MODEL_TYPE = "dmf"
CONFIG_VERSION = 1  # of config.json; bump when its keys change meaning


def params_hash(cfg_or_dict: Config | dict) -> str:
    """sha256 of the canonical JSON of the configuration (first 16 hex digits)."""
    data = cfg_or_dict if isinstance(cfg_or_dict, dict) else to_dict(cfg_or_dict)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def versions() -> dict[str, str]:
    import safetensors

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "safetensors": safetensors.__version__, "numpy": np.__version__}
    try:
        from importlib.metadata import version

        out["dmf"] = version("dmf")
    except Exception:  # noqa: BLE001 - the package may run from a source tree
        out["dmf"] = "unknown"
    return out


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def atomic_write_bytes(path: Path, writer) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    writer(tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _save_safetensors_sorted(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` with the ``__metadata__`` keys in sorted order.

    Reliability fix (issue 9): safetensors serialises ``__metadata__`` from a Rust HashMap, whose
    order changes from process to process, so the same weights gave a different file (and DVC hash)
    on every run and downstream stages re-ran needlessly. Reordering keeps the header's length.
    """
    from safetensors.torch import save

    data = save(state, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        fixed = json.dumps(header, separators=(",", ":")).encode()
        if len(fixed) <= n:  # same keys and values: same length; pad like safetensors does
            data = data[:8] + fixed.ljust(n, b" ") + data[8 + n:]
    Path(path).write_bytes(data)


def model_config(model: nn.Module) -> dict:
    """``config.json`` of ``model``: its architecture (:meth:`DMFModel.config`) + type and version."""
    return {"model_type": MODEL_TYPE, "format_version": CONFIG_VERSION, **unwrap(model).config()}


def save_model(model: nn.Module, out_dir: str | Path, *, cfg: Config, num_classes: int, stage: str,
               extra: dict | None = None) -> dict:
    """Write ``out_dir/model.safetensors``, ``out_dir/config.json`` and ``out_dir/meta.json``;
    return the metadata (meta.json)."""
    model = unwrap(model)
    out_dir = Path(out_dir)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "stage": stage,
        "num_classes": int(num_classes),
        "with_text": bool(getattr(model, "has_text", False)),
        "feature_dim": int(getattr(model, "feature_dim", 0)),
        "params_hash": params_hash(cfg),
        "versions": versions(),
        "config": to_dict(cfg),
        **(extra or {}),
    }
    atomic_write_bytes(out_dir / MODEL_FILE,
                        lambda p: _save_safetensors_sorted(state, p, {"format": FORMAT, "stage": stage}))
    (out_dir / CONFIG_FILE).write_text(json.dumps(model_config(model), indent=2, sort_keys=True) + "\n")
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def read_meta(model_dir: str | Path) -> dict:
    """``meta.json`` (provenance of a training stage's output); FileNotFoundError when absent."""
    path = Path(model_dir) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no model metadata (expected the output of a training stage)") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def read_config(model_dir: str | Path) -> dict | None:
    """``config.json`` of a model folder, checked for type and version; None when the folder has
    none (a model written before config.json existed)."""
    path = Path(model_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable model config ({exc})") from None
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
        got = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path}: model_type {got!r}, expected {MODEL_TYPE!r} (not a dmf model config)")
    if config.get("format_version") != CONFIG_VERSION:
        raise ValueError(f"{path}: format_version {config.get('format_version')!r}, this dmf reads "
                         f"version {CONFIG_VERSION} (written by another dmf version?)")
    return config


def read_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model weights")
    return load_file(str(path))


def model_from_config(config: dict, where: str | Path = CONFIG_FILE) -> nn.Module:
    """A DMFModel with random weights, built from ``config.json``'s architecture alone.

    Imports transformers only for a model that holds a trainable text encoder. ``where`` names
    the file in errors.
    """
    from dmf_core.model.build import DMFModel
    from dmf_core.model.fusion import FusionEncoder
    from dmf_core.model.vit import VisionTransformer

    def part(key: str, cls):
        try:
            return cls(**config[key])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {key}: cannot build {cls.__name__} ({exc.__class__.__name__}: {exc})") from None

    vit, fusion = part("image_encoder", VisionTransformer), part("fusion", FusionEncoder)
    text_encoder = None
    if config.get("text_encoder"):
        from dmf_core.model.text import TextEncoder

        text_encoder = part("text_encoder", TextEncoder)
    try:
        model = DMFModel(vit, fusion, int(config["num_classes"]), text_dim=config.get("text_dim"),
                         text_encoder=text_encoder, image_mean=config["image_mean"],
                         image_std=config["image_std"], attribute_classes=config.get("attribute_classes"),
                         align_head=bool(config.get("align_head")), teacher=config.get("teacher"))
    except KeyError as exc:
        raise ValueError(f"{where}: no {exc} (expected the keys DMFModel.config() writes)") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: cannot build the model ({exc.__class__.__name__}: {exc})") from None
    size = model.config()["image_size"]
    if "image_size" in config and list(config["image_size"]) != size:
        raise ValueError(f"{where}: image_size {config['image_size']} disagrees with the image_encoder's "
                         f"height x width {size}")
    return model


def _legacy_model(model_dir: Path) -> tuple[nn.Module, dict]:
    """A model folder without config.json (written before it existed): rebuilt from meta.json's
    pipeline config, as those models always were."""
    from dmf_core.model.build import build_model

    if not (model_dir / META_FILE).is_file():
        raise FileNotFoundError(f"{model_dir}: no {CONFIG_FILE} or {META_FILE} (expected a model folder a "
                                f"training stage wrote: {MODEL_FILE} + {CONFIG_FILE})")
    meta = read_meta(model_dir)
    cfg = config_from_dict(meta["config"])
    return build_model(cfg, meta["num_classes"], with_text=meta["with_text"], pretrained=False), meta


def _with_caption_bnneck(state: dict, model: nn.Module) -> dict:
    """Models with a text path written before captions had their own BNNeck shared one BNNeck
    between the modalities: that one serves both."""
    if getattr(getattr(model, "head", None), "text_bnneck", None) is None:
        return state
    if any(k.startswith("head.text_bnneck.") for k in state):
        return state
    shared = {k[len("head.bnneck."):]: v for k, v in state.items() if k.startswith("head.bnneck.")}
    return {**state, **{f"head.text_bnneck.{k}": v for k, v in shared.items()}}


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model a training stage wrote and load its weights (strictly); eval mode.

    The architecture comes from ``config.json`` (no pipeline config, no transformers import for
    an image-only model); ``meta.json`` is returned as provenance when present (else the
    number of classes, text path and feature dimension from config.json). A folder without
    config.json is rebuilt from meta.json's pipeline config.
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    if config is None:
        model, meta = _legacy_model(model_dir)
        source = META_FILE
    else:
        model = model_from_config(config, model_dir / CONFIG_FILE)
        meta = read_meta(model_dir) if (model_dir / META_FILE).is_file() else {
            k: config[k] for k in ("num_classes", "with_text", "feature_dim")}
        source = CONFIG_FILE
    state = _with_caption_bnneck(read_weights(model_dir), model)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{model_dir / MODEL_FILE}: does not match its {source} "
                         f"(missing {result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]})")
    return model.to(device).eval(), meta


def load_init_weights(model: nn.Module, model_dir: str | Path) -> list[str]:
    """Initialise ``model`` from a previous stage's weights, leaving out its classifier and text path.

    Every other parameter must be present with the same shape; the returned list names the
    tensors left out.
    """
    from dmf_core.model.build import CLASSIFIER_PREFIX, TEXT_PREFIXES

    model = unwrap(model)
    state = read_weights(model_dir)
    own = model.state_dict()
    skip = [k for k in state if k.startswith(CLASSIFIER_PREFIX) or k.startswith(TEXT_PREFIXES)]
    keep = {k: v for k, v in state.items() if k not in skip}
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in keep.items()
           if k in own and v.shape != own[k].shape]
    unexpected = [k for k in keep if k not in own]
    missing = [k for k in own if k not in keep
               and not k.startswith(CLASSIFIER_PREFIX) and not k.startswith(TEXT_PREFIXES)]
    if bad or unexpected or missing:
        raise ValueError(f"{Path(model_dir) / MODEL_FILE}: cannot initialise this model from it "
                         f"(shape mismatches {bad[:4]}, unexpected {unexpected[:4]}, missing {missing[:4]}); "
                         "were model.* or fusion.* changed between pretraining and fine-tuning?")
    model.load_state_dict(keep, strict=False)
    log.info("initialised from %s (%d tensors; left out %s)", model_dir, len(keep), skip)
    return skip
