"""The shared fusion transformer: one encoder for image tokens and caption tokens.

Each modality is projected to ``fusion.dim`` by its own Linear layer, gets its own position
embeddings and a modality (type) embedding, and is prefixed with the encoder's own CLS token.
Images and captions are separate sequences through the *same* blocks; f is the CLS output.
"""

from __future__ import annotations

import torch
from torch import nn

from dmf_core.model.vit import Block, init_weights

IMAGE, TEXT = 0, 1


class FusionEncoder(nn.Module):
    """Shared transformer over projected tokens; ``forward(tokens, modality, mask) -> f`` (B, dim)."""

    def __init__(
        self,
        dim: int,
        layers: int,
        heads: int,
        mlp_ratio: float,
        image_tokens: int,
        text_tokens: int | None,
        dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        # The constructor arguments, so that a saved model can be rebuilt without the pipeline config.
        self.init_kwargs = {"dim": dim, "layers": layers, "heads": heads, "mlp_ratio": mlp_ratio,
                            "image_tokens": image_tokens, "text_tokens": text_tokens, "dropout": dropout,
                            "drop_path": drop_path}
        self.dim = dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim))
        self.image_pos = nn.Parameter(torch.zeros(1, image_tokens, dim))
        self.text_pos = nn.Parameter(torch.zeros(1, text_tokens, dim)) if text_tokens else None
        self.type_embed = nn.Parameter(torch.zeros(2, dim))  # image, text (same shape in every mode)
        rates = [drop_path * i / max(layers - 1, 1) for i in range(layers)]
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        for p in (self.cls_token, self.cls_pos, self.image_pos, self.type_embed):
            nn.init.trunc_normal_(p, std=0.02)
        self.apply(init_weights)
        if self.text_pos is not None:  # drawn last: with or without it, the rest starts the same
            nn.init.trunc_normal_(self.text_pos, std=0.02)

    def forward(self, tokens: torch.Tensor, modality: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens`` (B, L, dim) already projected; ``mask`` bool (B, L), True on real tokens."""
        b, n, _ = tokens.shape
        if modality == IMAGE:
            pos = self.image_pos
        elif self.text_pos is None:
            raise RuntimeError("this fusion encoder was built without a text path (fusion.mode=image_only)")
        else:
            pos = self.text_pos
        if n > pos.shape[1]:
            raise ValueError(f"{n} tokens but only {pos.shape[1]} position embeddings for modality {modality}")
        x = tokens + pos[:, :n] + self.type_embed[modality]
        cls = (self.cls_token + self.cls_pos).expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1)
        if mask is not None:
            mask = torch.cat([mask.new_ones(b, 1), mask], dim=1)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x[:, 0])
