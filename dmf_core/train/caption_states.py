"""The frozen text encoder's token states of the pretraining captions, as a DVC output.

The ``encode_captions`` stage computes them once per caption table and text encoder and writes
them to ``data/caption_states/`` (a cached DVC output, so ``dvc exp run``, ``--queue`` and
``--temp`` experiments restore them from the DVC cache); pretraining reads them
(:func:`dmf_core.train.loop.warm_caption_states`) instead of encoding the captions itself.

The states are the ones pretraining would compute: the same call
(:meth:`CaptionStateCache.warm` over the same caption list, float16, the same chunks) on the
kind of device and with the CPU thread count of a pretraining rank. The folder holds

- ``info.json`` always: what is there, or why nothing is (``fusion.mode`` other than ``shared``,
  or a text encoder that trains: then pretraining reads no states);
- ``states.pt`` when there are states: every state that fits in ``CaptionStateCache.max_bytes``,
  with the key of what decides them (:func:`caption_states_key`) and the device type. Pretraining
  encodes whatever the file lacks, and encodes everything again (with a warning that says
  ``dvc repro -f encode_captions``) when the key or device type is not its own: the encoder's
  files and the library versions are in the key but are no DVC deps of the stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from importlib import metadata
from pathlib import Path

import torch

from dmf_core.config import Config
from dmf_core.model.text import CaptionStateCache, TextEncoder
from dmf_core.train.digest import text_encoder_digest
from dmf_core.train.distributed import rank_device, rank_settings, rank_threads

log = logging.getLogger(__name__)

STATES_FILE = "states.pt"
INFO_FILE = "info.json"
LIBRARIES = ("torch", "transformers", "tokenizers")  # their versions are in the key
REPRO = "dvc repro -f encode_captions"  # what makes the file this machine's and these libraries'


def caption_texts(parquet: str | Path) -> list[str]:
    """Every caption of the table in (image_id, caption_idx) order: the list pretraining's
    ``CaptionPicker`` holds and warms the cache with."""
    import pandas as pd

    frame = pd.read_parquet(parquet, columns=["image_id", "caption_idx", "caption"])
    frame = frame.sort_values(["image_id", "caption_idx"], kind="mergesort")
    return [str(s) for s in frame["caption"].tolist()]


def library_versions() -> dict[str, str | None]:
    """The versions of :data:`LIBRARIES`: torch's with its build (``+cu130``, ``+cpu``), the others
    as installed (None: not installed), read without importing them."""
    versions: dict[str, str | None] = {"torch": torch.__version__}
    for name in LIBRARIES[1:]:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def caption_states_key(cfg: Config, captions: list[str]) -> str:
    """What decides the frozen encoder's token states: the distinct captions, the encoder's
    files (or hub id), its truncation length and the versions of torch, transformers and
    tokenizers that run it."""
    h = hashlib.sha256(json.dumps({"encoder": text_encoder_digest(cfg.model.text.name),
                                   "name": cfg.model.text.name,
                                   "max_length": cfg.model.text.max_length,
                                   "libraries": library_versions()}, sort_keys=True).encode())
    for caption in sorted(set(captions)):
        h.update(caption.encode("utf-8") + b"\0")
    return h.hexdigest()[:32]


def nothing_to_encode(cfg: Config) -> str | None:
    """Why pretraining reads no cached states under ``cfg`` (None: it does)."""
    prototypes = cfg.fusion.mode == "prototypes" and cfg.fusion.teacher == "text"
    if cfg.fusion.mode != "shared" and not prototypes:
        return f"fusion.mode is {cfg.fusion.mode!r}: pretraining encodes no caption"
    if prototypes:  # the teacher's prototypes pool a frozen encoder's states, whatever model.text.freeze says
        return None
    if not cfg.model.text.freeze:
        return "model.text.freeze is false: the text encoder trains, so its states are computed per batch"
    return None


def encoding_threads(cfg: Config, device: torch.device) -> int:
    """The torch threads of a pretraining rank on ``device``: the stage runs as one process, the
    ``train.nproc`` ranks of pretraining as many (:func:`rank_threads`)."""
    return rank_threads(cfg.train.threads, device, cfg.train.nproc)


def save_caption_states(cache: CaptionStateCache, folder: Path, *, key: str, device: str) -> None:
    cache.save(folder / STATES_FILE, meta={"key": key, "device": device})


def load_caption_states(cache: CaptionStateCache, folder: Path, *, key: str, device: str) -> int | None:
    """Add the states of ``folder`` to ``cache`` when they are of this key and device type;
    returns how many it held, or None (and a warning saying why) when none were taken."""
    path = Path(folder) / STATES_FILE
    if not path.is_file():
        log.warning("%s: no caption states (the encode_captions stage writes them: `dvc repro "
                    "encode_captions`); encoding the captions here", path)
        return None
    try:
        return cache.load(path, expect={"key": key, "device": device})
    except (OSError, RuntimeError, KeyError, ValueError) as exc:  # stale, torn or foreign: recompute
        log.warning("%s: not these captions' states (%s); encoding the captions again. DVC does not "
                    "see what made it stale (the text encoder's own files, the torch, transformers or "
                    "tokenizers version, the kind of device): run `%s` on the machine that trains to write "
                    "this run's states", path, exc, REPRO)
        return None


def encode_caption_states(cfg: Config, captions_parquet: Path, out_dir: Path,
                          device: torch.device | None = None, max_bytes: int | None = None) -> dict:
    """The ``encode_captions`` stage: write ``out_dir`` (:data:`INFO_FILE`, and :data:`STATES_FILE`
    when pretraining reads states); returns the run facts. ``max_bytes``: the size bound of the
    states (default: ``CaptionStateCache``'s, the one pretraining's cache has)."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (STATES_FILE, INFO_FILE):
        (out_dir / name).unlink(missing_ok=True)
    facts = {"captions_encoded": 0, "torch": torch.__version__}
    reason = nothing_to_encode(cfg)
    if reason is not None:
        _write_info(out_dir, {"states": None, "reason": reason})
        log.info("caption token states: none (%s)", reason)
        return {**facts, "reason": reason, "wall_s": round(time.perf_counter() - started, 2)}

    device = device or rank_device()  # the device of pretraining's rank 0
    threads = encoding_threads(cfg, device)
    with rank_settings(threads, device):  # as pretraining's setup() sets them; restored after
        facts.update(_encode(cfg, captions_parquet, out_dir, device, max_bytes), threads=threads)
    return {**facts, "wall_s": round(time.perf_counter() - started, 2)}


def _encode(cfg: Config, captions_parquet: Path, out_dir: Path, device: torch.device,
            max_bytes: int | None) -> dict:
    """Encode, write :data:`STATES_FILE` and :data:`INFO_FILE`; returns the counts."""
    text = cfg.model.text
    captions = caption_texts(captions_parquet)
    bound = {} if max_bytes is None else {"max_bytes": max_bytes}
    cache = CaptionStateCache(lambda: TextEncoder(text.name, text.max_length, freeze=True).to(device), **bound)
    cache.warm(captions)
    key = caption_states_key(cfg, captions)
    save_caption_states(cache, out_dir, key=key, device=device.type)
    distinct = len(set(captions))
    _write_info(out_dir, {
        "states": STATES_FILE if len(cache) else None, "key": key, "device": device.type,
        "dtype": str(cache.dtype).removeprefix("torch."), "text_encoder": {"name": text.name, "max_length": text.max_length},
        "captions": distinct, "stored": len(cache), "complete": len(cache) == distinct, "bytes": cache.nbytes,
        "max_bytes": cache.max_bytes, "libraries": library_versions(),
    })
    if len(cache) < distinct:
        log.warning("caption token states: %d of %d captions fit in %.0f MB; pretraining encodes the "
                    "rest per batch", len(cache), distinct, cache.max_bytes / 2**20)
    return {"captions_encoded": cache.computed, "captions": distinct, "stored": len(cache),
            "bytes": cache.nbytes, "device": device.type}


def _write_info(out_dir: Path, info: dict) -> None:
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
