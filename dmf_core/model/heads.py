"""BNNeck and the identity classifier (bag-of-tricks re-ID head)."""

from __future__ import annotations

import torch
from torch import nn


class BNNeckHead(nn.Module):
    """f -> BatchNorm1d (bias frozen at 0) -> bias-free Linear -> ID logits.

    Triplet loss sees f, the ID loss sees BN(f); test time uses f (pre-BN).
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bnneck = nn.BatchNorm1d(dim)
        self.bnneck.bias.requires_grad_(False)
        nn.init.ones_(self.bnneck.weight)
        nn.init.zeros_(self.bnneck.bias)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def reset_classifier(self, num_classes: int) -> None:
        device = self.classifier.weight.device
        self.classifier = nn.Linear(self.classifier.in_features, num_classes, bias=False, device=device)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bnneck(f))
