"""Shared test setup: offline environment, a quiet ClearML config, tiny configurations."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("CLEARML_OFFLINE_MODE", "1")
os.environ.setdefault("DMF_LOG_LEVEL", "WARNING")


@pytest.fixture(scope="session", autouse=True)
def clearml_config(tmp_path_factory) -> Path:
    """ClearML reads this instead of ~/clearml.conf; no subprocess reporter (close() is instant)."""
    path = tmp_path_factory.mktemp("clearml") / "clearml.conf"
    path.write_text("sdk { development { report_use_subprocess: false } }\n")
    os.environ["CLEARML_CONFIG_FILE"] = str(path)
    return path


@pytest.fixture
def params_dict() -> dict:
    """A fresh copy of the embedded default params.yaml as a dict."""
    return copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))


@pytest.fixture
def tiny_params(params_dict) -> dict:
    """The default profile shrunk to seconds: few ids, tiny model, one epoch."""
    p = params_dict
    p["synth"]["synthped"].update(ids=8, images_per_id=6)
    for name in ("sp_market", "sp_cuhk", "sp_msmt"):
        p["synth"][name].update(train_ids=6, test_ids=6)
    p["model"]["image"].update(depth=1, dim=32, heads=2, height=64, width=32)
    p["fusion"].update(dim=32, layers=1, heads=2)
    for stage in ("pretrain", "finetune"):
        p[stage].update(epochs=1, P=4, K=2)
    p["evaluate"]["ranked_list_queries"] = 2
    return p
