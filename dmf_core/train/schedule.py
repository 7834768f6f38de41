"""Optimizer with parameter groups and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from dmf_core.config import StageTrainConfig

# 1-D parameters that are embeddings rather than scales/biases; no weight decay under AdamW.
NO_DECAY_NAMES = ("cls_token", "pos_embed", "cls_pos", "image_pos", "text_pos", "type_embed")


def param_groups(model: nn.Module, st: StageTrainConfig) -> list[dict]:
    """Weights, biases (lr x ``bias_lr_factor``) and other 1-D/embedding parameters.

    SGD (TransReID recipe) decays everything; AdamW decays only matrices (no decay on biases,
    norms and embeddings), the usual ViT practice.
    """
    decay_all = st.optimizer == "sgd"
    groups = {
        "weights": {"params": [], "lr": st.lr, "weight_decay": st.weight_decay},
        "biases": {"params": [], "lr": st.lr * st.bias_lr_factor,
                   "weight_decay": st.weight_decay if decay_all else 0.0},
        "other": {"params": [], "lr": st.lr, "weight_decay": st.weight_decay if decay_all else 0.0},
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(".bias"):
            groups["biases"]["params"].append(p)
        elif p.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES:
            groups["other"]["params"].append(p)
        else:
            groups["weights"]["params"].append(p)
    return [dict(g, name=k) for k, g in groups.items() if g["params"]]


def build_optimizer(model: nn.Module, st: StageTrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, st)
    # On CUDA the fused kernels update every tensor in a few launches (no per-tensor loop).
    fused = all(p.is_cuda for g in groups for p in g["params"]) or None
    if st.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=st.lr, momentum=st.momentum, fused=fused)
    return torch.optim.AdamW(groups, lr=st.lr, betas=(0.9, 0.999), fused=fused)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float,
              warmup_init_ratio: float = 0.01) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based).

    Linear warm-up from ``warmup_init_ratio`` to 1 over ``warmup_steps``, then a half cosine from
    1 down to ``min_ratio`` at ``total_steps`` (timm CosineLRScheduler's shape, stepped per step).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_init_ratio + (1.0 - warmup_init_ratio) * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(optimizer: torch.optim.Optimizer, st: StageTrainConfig, steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimizer-step schedule; warm-up spans ``warmup_epochs`` epochs of steps."""
    total = st.epochs * steps_per_epoch
    warmup = min(st.warmup_epochs * steps_per_epoch, total)

    def factor(step: int) -> float:
        return lr_factor(step, total, warmup, st.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
