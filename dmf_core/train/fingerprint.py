"""What a resumable training state must agree on before it is resumed.

A checkpoint in ``runs/<stage>/last.pt`` outlives the run that wrote it (DVC persists the folder),
so "the same params" is not enough: a fine-tuning resumed after its pretraining changed would
write the old weights again. The fingerprint therefore covers everything that determines the
trajectory:

- the stage's own params and every upstream param section it depends on (``synth``,
  ``captions``, ``pack``, the datasets it reads, and for fine-tuning the ``pretrain`` section);
- the *content* of its inputs: sha256 of the init weights (Stage I model, ``model.image.pretrained``),
  of the text encoder's files when it is a local folder, of the LMDB's metadata and sidecar index
  (which carry a sha1 of every stored image), and of the captions parquet;
- the training code itself (the files the loop runs: :mod:`dmf_core.code_deps`) and the torch version.

Anything left out here can only make a resume happen that should not, so when in doubt, add it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from dmf_core import code_deps
from dmf_core.config import Config, to_dict
from dmf_core.train.digest import file_sha256, text_encoder_digest

# Params that never change a trajectory: how often to checkpoint, how many processes (the world
# size is fingerprinted on its own), where to mirror scalars, what to evaluate afterwards.
_TRAIN_KEYS_IGNORED = ("checkpoint_every", "nproc")
_SECTIONS_IGNORED = ("tracking", "evaluate", "datasets", "finetune", "pretrain")


def code_digest(root: Path = code_deps.ROOT) -> str:
    """The training code: the loop and every file it runs (a fix in a loss must not be resumed
    over), the same import closure the training stages' DVC deps list (less the stage script and
    runtime.py, which only launch it)."""
    return code_deps.closure_digest(root / "dmf_core" / "train" / "loop.py", root)


def model_input_digests(cfg: Config, *, init_from: Path | None, with_text: bool) -> dict[str, str]:
    """Content digests of what the model starts from (the data side digests its own inputs:
    :func:`~dmf_core.data.store.lmdb_store.content_digest`, captions), plus the code and torch version that train it."""
    from dmf_core.model.pretrained import MODEL_FILE

    digests = {"code": code_digest(), "torch": torch.__version__}
    if with_text:
        digests["text_encoder"] = text_encoder_digest(cfg.model.text.name)
    if init_from is not None:
        digests["init_weights"] = file_sha256(Path(init_from) / MODEL_FILE)
    elif cfg.model.image.pretrained:
        digests["image_pretrained"] = file_sha256(cfg.model.image.pretrained)
    return digests


def relevant_params(cfg: Config, stage: str, datasets: list[str]) -> dict:
    """Every param section that shapes ``stage``'s trajectory, its own and upstream ones."""
    d = to_dict(cfg)
    params = {k: v for k, v in d.items() if k not in _SECTIONS_IGNORED}
    params["train"] = {k: v for k, v in d["train"].items() if k not in _TRAIN_KEYS_IGNORED}
    params["pretrain"] = d["pretrain"]  # fine-tuning starts from what pretraining made
    if stage == "finetune":
        params["finetune"] = {k: v for k, v in d["finetune"].items() if k != "sources"}
    params["datasets"] = {name: d["datasets"][name] for name in sorted(datasets) if name in d["datasets"]}
    return params


def training_fingerprint(cfg: Config, stage: str, *, datasets: list[str], inputs: dict[str, str],
                         num_classes: int, num_images: int, world_size: int) -> str:
    """sha256 (hex) of the canonical JSON of everything above."""
    blob = {"stage": stage, "params": relevant_params(cfg, stage, datasets), "inputs": inputs,
            "num_classes": num_classes, "num_images": num_images, "world_size": world_size}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()
