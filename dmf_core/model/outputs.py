"""What the training forward returns: typed fields, not string keys."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Branch:
    """One modality of a batch: ``feat`` f (the fusion CLS), ``neck`` BN(f) of its own modality's
    BNNeck (the retrieval feature and what the metric losses see), ``logits`` the identity logits;
    ``aligned`` the alignment head's projection of ``neck`` (``fusion.align_on: head``), which the
    image<->caption term then sees instead of ``neck``."""

    feat: torch.Tensor
    neck: torch.Tensor
    logits: torch.Tensor
    aligned: torch.Tensor | None = None


@dataclass
class ModelOutput:
    """``image`` always; ``text`` with captions (fusion.mode=shared); ``attributes`` (one logits
    tensor per attribute) with the attribute-head control (fusion.mode=attributes); ``teacher``
    the teacher head's logits (fusion.mode=prototypes | phrases)."""

    image: Branch
    text: Branch | None = None
    attributes: list[torch.Tensor] | None = None
    teacher: torch.Tensor | list[torch.Tensor] | None = None  # per attribute with phrases
