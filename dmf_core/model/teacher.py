"""Language as a teacher: a cosine classifier whose class weights are projected teacher vectors.

Two designs share it (docs/training.md, "Language as a teacher"):

* ``fusion.mode: prototypes`` -- one vector per training identity, the mean sentence embedding of
  its captions; the class weight is a projection of it shared by every identity plus a small
  per-identity residual (CLIP-ReID's second stage classifies images against the identities' text
  features the same way);
* ``fusion.mode: phrases`` -- one vector per attribute value, the embedding of the phrase the
  caption templates use for it; the logits of each attribute are the cosines with its values'
  projected phrases.

``fusion.teacher: learned`` is the no-language twin: the same head with learned vectors in place
of the text embeddings (is it the language, or the head?); ``fusion.captions: shuffled`` gives
each identity another one's prototype (the same vectors, untrue of the identity). The image side
is a linear projection P of BN(f): the teacher's gradient reaches BN(f) and the backbone through
P, which can absorb what only the teacher needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TeacherHead(nn.Module):
    """``forward(neck) -> logits`` (B, vectors): cosine(P neck, Q v_c + r_c) / temperature.

    ``vectors`` rows of width ``vector_dim``: a buffer to be filled with text embeddings
    (:meth:`set_vectors`), or, with ``learned``, a parameter (the twin). ``residual``: a
    per-vector residual added after the projection (starts at 0). ``groups``: class counts when
    the vectors are the values of several attributes (the logits are split by them)."""

    def __init__(self, dim: int, vectors: int, vector_dim: int, *, learned: bool, residual: bool,
                 temperature: float, groups: list[int] | None = None) -> None:
        super().__init__()
        self.init_kwargs = {"vectors": vectors, "vector_dim": vector_dim, "learned": learned,
                            "residual": residual, "temperature": temperature,
                            "groups": list(groups) if groups else None}
        if groups and sum(groups) != vectors:
            raise ValueError(f"teacher head: groups {groups} do not add up to {vectors} vectors")
        self.groups = list(groups) if groups else None
        self.temperature = float(temperature)
        self.image = nn.Linear(dim, dim, bias=False)
        self.text = nn.Linear(vector_dim, dim, bias=False)
        for layer in (self.image, self.text):
            nn.init.trunc_normal_(layer.weight, std=0.02)
        if learned:
            self.vectors = nn.Parameter(torch.randn(vectors, vector_dim) / vector_dim ** 0.5)
        else:
            self.register_buffer("vectors", torch.zeros(vectors, vector_dim))
        self.residual = nn.Parameter(torch.zeros(vectors, dim)) if residual else None

    @property
    def learned(self) -> bool:
        return isinstance(self.vectors, nn.Parameter)

    def set_vectors(self, vectors: torch.Tensor) -> None:
        """The text embeddings the class weights are projected from (language teacher only)."""
        if self.learned:
            raise RuntimeError("this teacher head learns its vectors (fusion.teacher: learned)")
        if tuple(vectors.shape) != tuple(self.vectors.shape):
            raise ValueError(f"teacher vectors: expected shape {tuple(self.vectors.shape)}, got {tuple(vectors.shape)}")
        self.vectors.copy_(vectors.to(self.vectors))

    def class_weights(self) -> torch.Tensor:
        w = self.text(self.vectors)
        if self.residual is not None:
            w = w + self.residual
        return F.normalize(w, dim=1)

    def forward(self, neck: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.image(neck), dim=1)
        return z @ self.class_weights().t() / self.temperature

    def split(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """Per attribute, its values' logits (``groups`` required)."""
        if self.groups is None:
            raise RuntimeError("this teacher head has one class per vector (no attribute groups)")
        return list(logits.split(self.groups, dim=1))
