"""Losses against brute-force references; the optimizer groups and the lr schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dmf_core.config import ConfigError, config_from_dict
from dmf_core.model.outputs import Branch, ModelOutput
from dmf_core.train.losses import align_loss, dmf_losses, id_loss, triplet_loss
from dmf_core.train.schedule import build_optimizer, build_scheduler, lr_factor, param_groups


def brute_triplet(x, y, margin, feature="f", margin_type="additive"):
    """Batch-hard triplet on L2-normalised features (less their mean) or raw ones, one anchor at a
    time; the ratio form compares log distances."""
    if feature != "raw":
        x = F.normalize(x - x.mean(0) if feature == "centred" else x, dim=1)
    total, satisfied, ordered, n = 0.0, 0, 0, 0
    for i in range(len(y)):
        pos = [torch.dist(x[i], x[j]) for j in range(len(y)) if j != i and y[j] == y[i]]
        neg = [torch.dist(x[i], x[j]) for j in range(len(y)) if y[j] != y[i]]
        if not pos or not neg:
            continue
        diff = max(pos) - min(neg) if margin_type == "additive" else torch.log(max(pos) / min(neg))
        total += F.softplus(diff) if margin is None else F.relu(diff + margin)
        satisfied += int(diff + (margin or 0.0) <= 0)
        ordered += int(diff < 0)
        n += 1
    return total / n, satisfied / n, ordered / n


@pytest.mark.parametrize("margin_type", ["additive", "ratio"])
@pytest.mark.parametrize("feature", ["f", "centred", "raw"])
@pytest.mark.parametrize("margin", [None, 0.0, 0.3, 1.5])
def test_batch_hard_triplet_matches_brute_force(params_dict, margin, feature, margin_type):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=g)
    x[:3] += 3.0  # identity 0 well separated: some anchors satisfy the margin
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 5])  # 4 and 5: anchors without a positive
    want, want_satisfied, want_ordered = brute_triplet(x, y, margin, feature, margin_type)
    assert torch.allclose(triplet_loss(x, y, margin, feature, margin_type), want, atol=1e-5)
    params_dict["loss"].update(triplet_margin=margin, triplet_feature=feature, triplet_margin_type=margin_type)
    out = ModelOutput(image=Branch(x, torch.randn(12, 5, generator=g), torch.randn(12, 6, generator=g)))
    losses = dmf_losses(out, y, config_from_dict(params_dict))
    assert float(losses["triplets_satisfied"]) == pytest.approx(want_satisfied)
    assert float(losses["triplets_ordered"]) == pytest.approx(want_ordered)
    assert 0.0 < want_ordered < 1.0 and (margin is None or want_satisfied <= want_ordered)


def test_triplet_is_scale_free():
    """On normalised f, shrinking every feature toward one point cannot lower the loss."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 4, generator=g), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert torch.allclose(triplet_loss(x, y), triplet_loss(1e-3 * x, y), atol=1e-5)


def test_a_shared_component_pins_the_triplet_on_f_at_its_margin_but_not_the_centred_one():
    """Every image's f = one large common vector + a small identity part (what pretraining's f
    became): normalised f puts every point together, the loss sits at its margin and no triplet
    is satisfied; less the batch mean, the identities separate."""
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    identity = torch.randn(4, 16, generator=g)[y] + 0.05 * torch.randn(8, 16, generator=g)
    f = 100.0 * torch.randn(1, 16, generator=g) + identity
    params = {"margin": 0.3}
    pinned = triplet_loss(f, y, **params)
    assert pinned == pytest.approx(0.3, abs=0.02)
    assert triplet_loss(f, y, feature="centred", **params) == 0.0  # every anchor past its margin
    # unnormalised, the common vector cancels out of every distance: the identities' own scale decides
    assert triplet_loss(f, y, feature="raw", **params) == 0.0


def test_the_ratio_triplet_sees_the_identities_under_a_shared_component():
    """The same f as above: the common vector shrinks every normalised distance alike, which the
    ratio form cancels, so its anchors are past the margin as on centred f, and growing the
    common vector (the collapse) leaves the loss where it was."""
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    identity = torch.randn(4, 16, generator=g)[y] + 0.05 * torch.randn(8, 16, generator=g)
    common = torch.randn(1, 16, generator=g)
    f = 100.0 * common + identity
    assert triplet_loss(f, y, 0.3, margin_type="ratio") == 0.0
    close = identity + 1.5 * torch.randn(8, 16, generator=g)  # identities that overlap: loss > 0
    # (far beyond 300x the identities' scale, fp32 distances lose the identities in rounding)
    small = triplet_loss(10.0 * common + close, y, 0.3, margin_type="ratio")
    large = triplet_loss(300.0 * common + close, y, 0.3, margin_type="ratio")
    assert small > 0.0 and float(large) == pytest.approx(float(small), rel=0.02)
    # the additive form is lowered by the collapse, toward its margin
    assert triplet_loss(300.0 * common + close, y, 0.3) < triplet_loss(10.0 * common + close, y, 0.3) - 0.02


def test_at_margin_0_the_shared_component_does_not_pin_the_hinge():
    """The same collapsed f: at 0.3 every anchor stays inside the margin however well the
    identities are ordered; at 0 an anchor whose hardest negative is beyond its hardest positive
    is done (no loss, no gradient), and only the disordered ones still pull."""
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    identity = torch.randn(4, 16, generator=g)[y] + 0.05 * torch.randn(8, 16, generator=g)
    common = 100.0 * torch.randn(1, 16, generator=g)
    assert triplet_loss(common + identity, y, 0.3) == pytest.approx(0.3, abs=0.02)
    assert triplet_loss(common + identity, y, 0.0) == 0.0
    f = (common + identity).clone()
    f[1] = common[0] + identity[2]  # image 1 of identity 0 looks like identity 1
    f.requires_grad_(True)
    triplet_loss(f, y, 0.0).backward()
    moved = f.grad.abs().sum(1) > 0
    assert moved[[0, 1, 2, 3]].all() and not moved[[4, 5, 6, 7]].any()


@pytest.mark.parametrize("margin_type", ["additive", "ratio"])
def test_triplet_gradient_is_finite_with_duplicate_features(margin_type):
    x = torch.ones(4, 3, requires_grad=True)
    triplet_loss(x, torch.tensor([0, 0, 1, 1]), margin_type=margin_type).backward()
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


def _branch(g, n=4, dim=8, classes=3) -> Branch:
    return Branch(torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g),
                  torch.randn(n, classes, generator=g))


def test_dmf_losses_weigh_the_terms_and_bound_the_captions_share(params_dict):
    params_dict["loss"].update(id_weight=0.5, triplet_weight=2.0, caption_id_share=0.2)
    params_dict["fusion"].update(align_weight=0.25, align_temperature=0.1)
    cfg = config_from_dict(params_dict)
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0, 0, 1, 1])
    out = ModelOutput(image=_branch(g), text=_branch(g))
    losses = dmf_losses(out, y, cfg)
    want_id = 0.8 * id_loss(out.image.logits, y, 0.1) + 0.2 * id_loss(out.text.logits, y, 0.1)
    assert torch.allclose(losses["id_loss"], want_id)
    # the triplet runs over the images' f only: a caption is never an image's hardest positive
    assert torch.allclose(losses["triplet_loss"], triplet_loss(out.image.feat, y, cfg.loss.triplet_margin))
    assert torch.allclose(losses["align_loss"], align_loss(out.image.neck, out.text.neck, y, 0.1))
    assert torch.allclose(losses["loss"], 0.5 * losses["id_loss"] + 2.0 * losses["triplet_loss"]
                          + 0.25 * losses["align_loss"])
    image_only = dmf_losses(ModelOutput(image=out.image), y, cfg)
    assert image_only["align_loss"] == 0 and torch.allclose(image_only["id_loss"], id_loss(out.image.logits, y, 0.1))


def test_caption_share_above_half_is_refused(params_dict):
    params_dict["loss"]["caption_id_share"] = 0.6
    with pytest.raises(ConfigError, match="caption_id_share"):
        config_from_dict(params_dict)


def test_attribute_head_loss_is_the_mean_cross_entropy(params_dict):
    params_dict["fusion"]["mode"] = "attributes"
    cfg = config_from_dict(params_dict)
    g = torch.Generator().manual_seed(4)
    y = torch.tensor([0, 0, 1, 1])
    logits = [torch.randn(4, 2, generator=g), torch.randn(4, 3, generator=g)]
    targets = torch.tensor([[0, 2], [0, 2], [1, 0], [1, 0]])
    out = ModelOutput(image=_branch(g), attributes=logits)
    losses = dmf_losses(out, y, cfg, targets)
    want = 0.5 * (F.cross_entropy(logits[0], targets[:, 0]) + F.cross_entropy(logits[1], targets[:, 1]))
    assert torch.allclose(losses["attribute_loss"], want)
    assert torch.allclose(losses["loss"], losses["id_loss"] + losses["triplet_loss"] + want)
    with pytest.raises(ValueError, match="attribute targets"):
        dmf_losses(out, y, cfg)


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
