"""torchreid 0.2.5's reference evaluation and re-ranking, loaded by file path (never `import torchreid`:
its package __init__ needs packages it does not declare). Skips when the reference extra is missing."""

from __future__ import annotations

import importlib.util
import sys
import sysconfig
import warnings
from pathlib import Path

import pytest


def _site_file(rel: str) -> Path | None:
    for key in ("purelib", "platlib"):
        path = Path(sysconfig.get_paths()[key]) / rel
        if path.is_file():
            return path
    return None


def load(rel: str, name: str):
    path = _site_file(rel)
    if path is None:
        pytest.skip(f"torchreid reference file {rel} not installed (pip install --no-deps torchreid==0.2.5)")
    stub = "torchreid.reid.metrics.rank_cylib.rank_cy"
    saved = sys.modules.get(stub, "missing")
    sys.modules[stub] = None  # makes the optional Cython import fail cleanly: the Python path is used
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec.loader.exec_module(module)
    finally:
        if saved == "missing":
            del sys.modules[stub]
        else:
            sys.modules[stub] = saved
    return module


def rank_module():
    return load("torchreid/reid/metrics/rank.py", "_torchreid_rank_ref")


def rerank_module():
    return load("torchreid/reid/utils/rerank.py", "_torchreid_rerank_ref")
