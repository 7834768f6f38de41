"""Resumable training state: ``last.pt`` under the persisted work folder.

Fingerprint, model, optimizer, scheduler, epoch and the curve so far, written atomically and
read back with ``torch.load(weights_only=True)``; removed once the stage's outputs are written.
No RNG state: every epoch reseeds from (seed, epoch, rank). The model files themselves are
:mod:`dmf_core.model.pretrained`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmf_core.model.pretrained import atomic_write_bytes

log = logging.getLogger(__name__)

STATE_FILE = "last.pt"


def _plain(obj: Any) -> Any:
    """NumPy values -> Python values, so the state loads with ``weights_only=True``."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def save_training_state(work_dir: str | Path, state: dict) -> Path:
    """Atomically write ``work_dir/last.pt`` (a crash mid-write leaves the previous one intact)."""
    path = Path(work_dir) / STATE_FILE
    atomic_write_bytes(path, lambda p: torch.save(_plain(state), p))
    return path


def load_training_state(work_dir: str | Path) -> dict | None:
    path = Path(work_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file: start over, say why
        log.warning("%s: unreadable training state (%s); starting from scratch", path, exc)
        return None


def remove_training_state(work_dir: str | Path) -> None:
    """Delete ``work_dir/last.pt`` (the run it belongs to is finished)."""
    (Path(work_dir) / STATE_FILE).unlink(missing_ok=True)
