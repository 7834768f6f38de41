"""Fault injection, configuration: every size / rate a user can get wrong is one clear error.

test_config.py covers unknown keys, wrong types, non-mapping and non-UTF-8 YAML, and one stage
run; this file sweeps the negative / zero sizes and the divisibility rules key by key.
"""

from __future__ import annotations

import pytest

from dmf_core.config import ConfigError, config_from_dict


def _set(params: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[leaf] = value


CHECKED = [
    ("model.image.depth", 0), ("model.image.dim", -192), ("model.image.heads", 0), ("model.image.patch", -16),
    ("model.image.stride", 0), ("model.image.height", -128), ("model.image.width", 0),
    ("model.text.max_length", -1), ("fusion.dim", 0), ("fusion.layers", -2), ("fusion.heads", -4),
    ("fusion.mlp_ratio", 0.0), ("captions.per_image", 0), ("train.nproc", 0), ("train.threads", -1),
    ("train.checkpoint_every", 0), ("train.num_workers", -1), ("evaluate.batch_size", -128),
    ("evaluate.max_rank", 0), ("pretrain.epochs", 0), ("pretrain.P", -16), ("pretrain.K", 0),
    ("pretrain.lr", -0.001), ("pretrain.accumulate", 0), ("finetune.K", -4), ("finetune.warmup_epochs", -1),
    ("finetune.weight_decay", -0.05), ("fusion.dropout", 1.5), ("augment.erasing", -0.1),
    ("loss.label_smoothing", 1.0), ("pack.resize", [-1, 64]), ("pack.resize", [128]),
]


@pytest.mark.parametrize(("key", "value"), CHECKED, ids=[f"{k}={v}" for k, v in CHECKED])
def test_bad_size_names_the_key(params_dict, key, value):
    _set(params_dict, key, value)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        config_from_dict(params_dict)
    assert repr(value) in str(err.value) or str(value) in str(err.value)


@pytest.mark.parametrize(("dim", "heads", "key"), [
    (250, 4, "fusion"), (64, 3, "fusion"), (190, 3, "model.image"), (100, 8, "model.image")])
def test_dim_not_divisible_by_heads(params_dict, dim, heads, key):
    _set(params_dict, f"{key}.dim", dim)
    _set(params_dict, f"{key}.heads", heads)
    with pytest.raises(ConfigError, match=rf"{key}\.dim: {dim} is not divisible by {key}\.heads={heads}"):
        config_from_dict(params_dict)


def test_image_smaller_than_a_patch(params_dict):
    _set(params_dict, "model.image.height", 8)
    with pytest.raises(ConfigError, match="smaller than one patch"):
        config_from_dict(params_dict)


# Gaps found by the fault sweep, now refused by dmf_core/config.py before any work (they used to
# fail only later, in the generator, the augmentation or the optimiser).
UNCHECKED = [("synth.height", -8), ("synth.width", 0), ("synth.synthped.ids", -3),
             ("synth.synthped.images_per_id", 0), ("synth.sp_market.train_ids", -1), ("augment.pad", -4),
             ("pretrain.grad_clip", -1.0), ("loss.triplet_margin", -0.3), ("loss.id_weight", -1.0),
             ("augment.std", [0.5, 0.0, 0.5])]


@pytest.mark.parametrize(("key", "value"), UNCHECKED, ids=[f"{k}={v}" for k, v in UNCHECKED])
def test_late_failing_sizes_are_refused(params_dict, key, value):
    _set(params_dict, key, value)
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        config_from_dict(params_dict)
