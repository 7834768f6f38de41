"""The re-ID head: a BNNeck per modality and one identity classifier (bag-of-tricks head).

Images and captions never share BatchNorm statistics: the modality gap between them would set
the scale of the normalised feature (docs/training.md). They do share the classifier, whose
weights are the identity prototypes of the common space.
"""

from __future__ import annotations

import torch
from torch import nn


def _bnneck(dim: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(dim)
    bn.bias.requires_grad_(False)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return bn


class BNNeckHead(nn.Module):
    """f -> BatchNorm1d of its modality (bias frozen at 0) -> bias-free Linear -> ID logits.

    The triplet and the alignment see f, the ID loss sees BN(f); test time uses f (pre-BN).
    ``with_text`` adds the captions' own BNNeck (``text_bnneck``).
    """

    def __init__(self, dim: int, num_classes: int, with_text: bool = False) -> None:
        super().__init__()
        self.bnneck = _bnneck(dim)
        self.text_bnneck = _bnneck(dim) if with_text else None
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def reset_classifier(self, num_classes: int) -> None:
        device = self.classifier.weight.device
        self.classifier = nn.Linear(self.classifier.in_features, num_classes, bias=False, device=device)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, f: torch.Tensor, text: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(BN(f), logits) with the BNNeck of the images or, with ``text``, of the captions."""
        bn = self.text_bnneck if text else self.bnneck
        if bn is None:
            raise RuntimeError("this head was built without a caption BNNeck (no text path)")
        neck = bn(f)
        return neck, self.classifier(neck)


class AttributeHead(nn.Module):
    """One softmax classifier per attribute on BN(f) of the images: the attribute-head control
    (the same attributes the captions state, as labels, without language)."""

    def __init__(self, dim: int, classes_per_attribute: list[int]) -> None:
        super().__init__()
        self.classes_per_attribute = [int(c) for c in classes_per_attribute]
        self.linear = nn.Linear(dim, sum(self.classes_per_attribute))
        nn.init.normal_(self.linear.weight, std=0.001)
        nn.init.zeros_(self.linear.bias)

    def forward(self, neck: torch.Tensor) -> list[torch.Tensor]:
        return list(self.linear(neck).split(self.classes_per_attribute, dim=1))


class AlignHead(nn.Module):
    """A two-layer projection per modality for the image<->caption contrastive term
    (``fusion.align_on: head``): the term shapes g(BN(f)), so the retrieval feature BN(f) is not
    itself the aligned feature (the head can absorb what only alignment needs)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.image, self.text = _mlp(dim), _mlp(dim)

    def forward(self, neck: torch.Tensor, text: bool = False) -> torch.Tensor:
        return (self.text if text else self.image)(neck)


def _mlp(dim: int) -> nn.Sequential:
    mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
    for layer in (mlp[0], mlp[2]):
        nn.init.trunc_normal_(layer.weight, std=0.02)
        nn.init.zeros_(layer.bias)
    return mlp
