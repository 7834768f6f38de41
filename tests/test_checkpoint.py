"""Model files and training state: round trips, init from a previous stage, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dmf_core.config import config_from_dict
from dmf_core.model.build import build_model
from dmf_core.train import checkpoint as ckpt


def _cfg(params: dict, dim: int = 32):
    params["model"]["image"].update(depth=1, dim=dim, heads=2, height=32, width=16, patch=8, stride=8)
    params["fusion"].update(dim=32, layers=1, heads=2, mode="image_only")
    return config_from_dict(params)


def test_save_and_load_model_round_trip(params_dict, tmp_path):
    cfg = _cfg(params_dict)
    model = build_model(cfg, 6).eval()
    meta = ckpt.save_model(model, tmp_path / "m", cfg=cfg, num_classes=6, stage="pretrain", extra={"epochs": 3})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["meta.json", "model.safetensors"]
    assert meta["params_hash"] == ckpt.params_hash(cfg) and meta["epochs"] == 3
    loaded, meta2 = ckpt.load_model(tmp_path / "m")
    assert meta2 == json.loads(json.dumps(meta))
    x = torch.randn(2, 3, 32, 16)
    assert torch.equal(loaded.embed_images(x), model.embed_images(x))


def test_init_weights_skip_classifier_only(params_dict, tmp_path):
    cfg = _cfg(params_dict)
    src = build_model(cfg, 6)
    ckpt.save_model(src, tmp_path / "m", cfg=cfg, num_classes=6, stage="pretrain")
    dst = build_model(cfg, 3)
    skipped = ckpt.load_init_weights(dst, tmp_path / "m")
    assert skipped == ["head.classifier.weight"]
    for k, v in src.state_dict().items():
        if not k.startswith("head.classifier"):
            assert torch.equal(dst.state_dict()[k], v), k


def test_init_weights_refuse_other_architecture(params_dict, tmp_path):
    import copy

    cfg = _cfg(copy.deepcopy(params_dict))
    ckpt.save_model(build_model(cfg, 6), tmp_path / "m", cfg=cfg, num_classes=6, stage="pretrain")
    other = build_model(_cfg(params_dict, dim=64), 3)
    with pytest.raises(ValueError, match="shape mismatches"):
        ckpt.load_init_weights(other, tmp_path / "m")


def test_missing_model_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        ckpt.load_model(tmp_path / "nothing")


def test_training_state_round_trip(tmp_path):
    state = {"epoch": 2, "fingerprint": "abc", "totals": {"images": np.int64(8), "arr": np.arange(3)},
             "curve": [{"epoch": 1, "loss": 1.0}], "model": {"w": torch.ones(2)}}
    ckpt.save_training_state(tmp_path, state)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
    loaded = ckpt.load_training_state(tmp_path)
    assert loaded["totals"] == {"images": 8, "arr": [0, 1, 2]} and torch.equal(loaded["model"]["w"], torch.ones(2))
    ckpt.remove_training_state(tmp_path)
    assert ckpt.load_training_state(tmp_path) is None


def test_torn_training_state_is_ignored(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    assert ckpt.load_training_state(tmp_path) is None
    assert ckpt.load_training_state(tmp_path / "empty") is None
