"""The weight average a stage saves with ``<stage>.ema > 0``: the average itself, a training run
it leaves unchanged, and a resume that carries it."""

from __future__ import annotations

import pytest
import torch
from _training import memory_stage_data, outputs, tiny_cfg
from torch import nn

from dmf_core.model import pretrained
from dmf_core.train import loop
from dmf_core.train.ema import WeightAverage


def test_the_shadow_is_the_decayed_average_with_a_warm_up():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    avg = WeightAverage(model, decay=0.9)
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[1].num_batches_tracked += 3
    avg.update(model)  # step 0: d = min(0.9, 1/10) = 0.1
    assert torch.allclose(avg.shadow[0].weight, 0.1 * w0 + 0.9 * (w0 + 1.0))
    assert int(avg.shadow[1].num_batches_tracked) == 3  # integer buffers are copied, not averaged
    assert not any(p.requires_grad for p in avg.shadow.parameters())
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model, decay=1.0)


def test_averaging_saves_other_weights_from_the_same_trajectory_and_resumes(params_dict, tmp_path, monkeypatch):
    plain_cfg = tiny_cfg(params_dict, epochs=3)
    plain = outputs(tmp_path, "plain")
    loop.train(plain_cfg, "pretrain", memory_stage_data(plain_cfg, "pretrain"), **plain)
    cfg = tiny_cfg(params_dict, epochs=3, ema=0.5)
    avg = outputs(tmp_path, "avg")
    loop.train(cfg, "pretrain", memory_stage_data(cfg, "pretrain"), **avg)
    # the training itself is the same: the same curve; what is saved is the average
    assert avg["curve_path"].read_text() == plain["curve_path"].read_text()
    a, b = pretrained.read_weights(plain["out_dir"]), pretrained.read_weights(avg["out_dir"])
    assert not torch.equal(a["image_proj.weight"], b["image_proj.weight"])

    # stopped after epoch 2, resumed: the average is part of the saved state
    real = loop.train_one_epoch
    def stop_at_third(run, epoch, *args):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(run, epoch, *args)
    resumed = outputs(tmp_path, "resumed")
    monkeypatch.setattr(loop, "train_one_epoch", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, "pretrain", memory_stage_data(cfg, "pretrain"), **resumed)
    monkeypatch.setattr(loop, "train_one_epoch", real)
    record = loop.train(cfg, "pretrain", memory_stage_data(cfg, "pretrain"), **resumed)
    assert record["run"]["resumed_from_epoch"] == 2
    c = pretrained.read_weights(resumed["out_dir"])
    assert all(torch.equal(b[k], c[k]) for k in b)
