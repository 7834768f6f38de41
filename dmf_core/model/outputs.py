"""What the training forward returns: typed fields, not string keys."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Branch:
    """One modality of a batch: ``feat`` f (the fusion CLS), ``neck`` BN(f) of its own modality's
    BNNeck (the retrieval feature and what the metric losses see), ``logits`` the identity logits."""

    feat: torch.Tensor
    neck: torch.Tensor
    logits: torch.Tensor


@dataclass
class ModelOutput:
    """``image`` always; ``text`` with captions (fusion.mode=shared); ``attributes`` (one logits
    tensor per attribute) with the attribute-head control (fusion.mode=attributes)."""

    image: Branch
    text: Branch | None = None
    attributes: list[torch.Tensor] | None = None
