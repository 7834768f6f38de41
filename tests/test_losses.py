"""Losses against brute-force references; the optimizer groups and the lr schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dmf_core.config import config_from_dict
from dmf_core.train.losses import align_loss, dmf_losses, id_loss, triplet_loss
from dmf_core.train.schedule import build_optimizer, build_scheduler, lr_factor, param_groups


def brute_triplet(x, y, margin):
    total, n = 0.0, 0
    for i in range(len(y)):
        pos = [torch.dist(x[i], x[j]) for j in range(len(y)) if j != i and y[j] == y[i]]
        neg = [torch.dist(x[i], x[j]) for j in range(len(y)) if y[j] != y[i]]
        if not pos or not neg:
            continue
        diff = max(pos) - min(neg)
        total += F.softplus(diff) if margin is None else F.relu(diff + margin)
        n += 1
    return total / n


@pytest.mark.parametrize("margin", [None, 0.3])
def test_batch_hard_triplet_matches_brute_force(margin):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=g)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 5])  # 4 and 5: anchors without a positive
    assert torch.allclose(triplet_loss(x, y, margin), brute_triplet(x, y, margin), atol=1e-5)


def test_triplet_gradient_is_finite_with_duplicate_features():
    x = torch.ones(4, 3, requires_grad=True)
    triplet_loss(x, torch.tensor([0, 0, 1, 1])).backward()
    assert torch.isfinite(x.grad).all()


def test_id_loss_is_label_smoothed_cross_entropy():
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.allclose(id_loss(logits, y, 0.1), F.cross_entropy(logits, y, label_smoothing=0.1))


def test_align_loss_rewards_matching_identities():
    y = torch.tensor([0, 0, 1, 1])
    proto = torch.eye(4)[:2] * 10
    img = proto[y]
    assert align_loss(img, img, y) < align_loss(img, proto[1 - y], y)
    # two positives per row: the loss floor is log(2) for a perfect identity match
    assert align_loss(img * 10, img * 10, y, temperature=0.01) == pytest.approx(math.log(2), abs=1e-3)


def test_dmf_losses_combine_modalities_with_weights(params_dict):
    params_dict["loss"].update(id_weight=0.5, triplet_weight=2.0)
    params_dict["fusion"].update(align_weight=0.25)
    cfg = config_from_dict(params_dict)
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0, 0, 1, 1])
    out = {"image_feat": torch.randn(4, 8, generator=g), "text_feat": torch.randn(4, 8, generator=g),
           "image_logits": torch.randn(4, 3, generator=g), "text_logits": torch.randn(4, 3, generator=g)}
    losses = dmf_losses(out, y, cfg)
    yy = torch.cat([y, y])
    assert torch.allclose(losses["id_loss"], id_loss(torch.cat([out["image_logits"], out["text_logits"]]), yy, 0.1))
    assert torch.allclose(losses["triplet_loss"], triplet_loss(torch.cat([out["image_feat"], out["text_feat"]]), yy))
    assert torch.allclose(losses["loss"], 0.5 * losses["id_loss"] + 2.0 * losses["triplet_loss"]
                          + 0.25 * losses["align_loss"])
    image_only = dmf_losses({k: out[k] for k in ("image_feat", "image_logits")}, y, cfg)
    assert image_only["align_loss"] == 0


@pytest.mark.parametrize("feature", ["f", "bnneck"])
@pytest.mark.parametrize("scope", ["joint", "within", "images"])
def test_triplet_scope_and_feature_pick_the_right_features(params_dict, scope, feature):
    params_dict["loss"].update(triplet_scope=scope, triplet_feature=feature)
    cfg = config_from_dict(params_dict)
    g = torch.Generator().manual_seed(2)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    out = {k: torch.randn(6, 8, generator=g) for k in ("image_feat", "text_feat", "image_neck", "text_neck")}
    out.update(image_logits=torch.randn(6, 3, generator=g), text_logits=torch.randn(6, 3, generator=g))
    key = "feat" if feature == "f" else "neck"
    img, txt = out[f"image_{key}"], out[f"text_{key}"]
    want = {"joint": triplet_loss(torch.cat([img, txt]), torch.cat([y, y])),
            "within": 0.5 * (triplet_loss(img, y) + triplet_loss(txt, y)),
            "images": triplet_loss(img, y)}[scope]
    assert torch.allclose(dmf_losses(out, y, cfg)["triplet_loss"], want)
    # without captions every scope is the image triplet
    alone = dmf_losses({k: out[k] for k in ("image_feat", "image_neck", "image_logits")}, y, cfg)
    assert torch.allclose(alone["triplet_loss"], triplet_loss(img, y))


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 100, 10, 0.002) == pytest.approx(0.01)
    assert lr_factor(5, 100, 10, 0.002) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(10, 100, 10, 0.002) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.002) == pytest.approx(0.002 + 0.998 * 0.5)
    assert lr_factor(100, 100, 10, 0.002) == pytest.approx(0.002)
    assert lr_factor(0, 100, 0, 0.1) == pytest.approx(1.0)


def test_param_groups_bias_factor_and_decay(params_dict):
    params_dict["pretrain"].update(optimizer="sgd", lr=0.008, bias_lr_factor=2.0, weight_decay=1e-4,
                                   epochs=2, warmup_epochs=1)
    params_dict["fusion"]["mode"] = "image_only"
    cfg = config_from_dict(params_dict)
    from dmf_core.model.build import build_model

    model = build_model(cfg, 5)
    groups = {g["name"]: g for g in param_groups(model, cfg.pretrain)}
    assert groups["biases"]["lr"] == pytest.approx(0.016) and groups["weights"]["lr"] == pytest.approx(0.008)
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = build_optimizer(model, cfg.pretrain)
    assert isinstance(opt, torch.optim.SGD)
    sched = build_scheduler(opt, cfg.pretrain, steps_per_epoch=4)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[1]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.016 * 0.01) and max(lrs) == pytest.approx(0.016)
    assert lrs[-1] < lrs[4]
    adamw = build_optimizer(model, cfg.finetune)
    groups = {g["name"]: g for g in adamw.param_groups}
    assert groups["biases"]["weight_decay"] == 0 and groups["other"]["weight_decay"] == 0
