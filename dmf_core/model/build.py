"""DMFModel and ``build_model(cfg, num_classes)``.

```
image ─► ViT ─► all output tokens ─► image_proj ─┐
                                                 ├─► FusionEncoder (shared) ─► f ─► BNNeck ─► classifier
caption ─► text encoder ─► tokens ─► text_proj ──┘
```
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from dmf_core.config import Config
from dmf_core.model.fusion import IMAGE, TEXT, FusionEncoder
from dmf_core.model.heads import BNNeckHead
from dmf_core.model.vit import VisionTransformer, load_pretrained

log = logging.getLogger(__name__)

# Parameters that are specific to one training stage and never carried into the next one.
CLASSIFIER_PREFIX = "head.classifier."
TEXT_PREFIXES = ("text_proj.", "text_encoder.", "fusion.text_pos")


class DMFModel(nn.Module):
    """Image encoder + (optional) text projection + shared fusion encoder + BNNeck head.

    ``image_mean`` / ``image_std`` are the per-channel normalisation the model was trained with
    (the data path applies it, ``forward`` does not); they are kept so that a saved model says
    what it must be fed (:meth:`config`).
    """

    def __init__(
        self,
        image_encoder: VisionTransformer,
        fusion: FusionEncoder,
        num_classes: int,
        text_dim: int | None = None,
        text_encoder: nn.Module | None = None,
        bnneck_per_modality: bool = False,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
    ) -> None:
        super().__init__()
        self.bnneck_per_modality = bnneck_per_modality
        self.text_dim = int(text_dim) if text_dim else None
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.image_encoder = image_encoder
        self.image_proj = nn.Linear(image_encoder.dim, fusion.dim)
        self.text_proj = nn.Linear(text_dim, fusion.dim) if text_dim else None
        # Registered only when trainable (model.text.freeze=false); a frozen encoder lives in the
        # training loop's caption cache and is not part of the weights.
        self.text_encoder = text_encoder
        self.fusion = fusion
        self.head = BNNeckHead(fusion.dim, num_classes)
        for proj in (self.image_proj, self.text_proj):
            if proj is not None:
                nn.init.trunc_normal_(proj.weight, std=0.02)
                nn.init.zeros_(proj.bias)

    @property
    def has_text(self) -> bool:
        return self.text_proj is not None

    @property
    def feature_dim(self) -> int:
        return self.fusion.dim

    def reset_classifier(self, num_classes: int) -> None:
        self.head.reset_classifier(num_classes)

    def config(self) -> dict:
        """What rebuilds this architecture (JSON-able), read from the submodules' constructor
        arguments, never from params.yaml: ``DMFModel(VisionTransformer(**image_encoder),
        FusionEncoder(**fusion), num_classes, text_dim, TextEncoder(**text_encoder) or None,
        bnneck_per_modality, image_mean, image_std)``. ``image_size`` (H, W) and ``feature_dim``
        repeat what a user of the model needs to know."""
        vit = self.image_encoder.init_kwargs
        text = getattr(self.text_encoder, "init_kwargs", None)
        return {
            "image_size": [int(vit["height"]), int(vit["width"])],
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "feature_dim": int(self.feature_dim),
            "num_classes": int(self.head.num_classes),
            "with_text": bool(self.has_text),
            "text_dim": self.text_dim,
            "bnneck_per_modality": bool(self.bnneck_per_modality),
            "image_encoder": dict(vit),
            "fusion": dict(self.fusion.init_kwargs),
            "text_encoder": dict(text) if text is not None else None,
        }

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """f for a batch of images (B, 3, H, W): the fusion CLS output, before BNNeck."""
        return self.fusion(self.image_proj(self.image_encoder(images)), IMAGE)

    def embed_text_states(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """f for captions given their encoder token states (B, L, D_text) and mask (B, L)."""
        if self.text_proj is None:
            raise RuntimeError("this model has no text path (built with fusion.mode=image_only or for fine-tuning)")
        return self.fusion(self.text_proj(states), TEXT, mask)

    def forward(
        self,
        images: torch.Tensor,
        text_states: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        captions: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Training forward: f (``*_feat``), BN(f) (``*_neck``) and ID logits of the images and, if
        given, of their captions (one BNNeck batch over both).

        Captions come either as precomputed token states (frozen text encoder) or as strings
        (trainable text encoder registered in this model).
        """
        out = {"image_feat": self.embed_images(images)}
        if captions is not None:
            if self.text_encoder is None:
                raise RuntimeError("captions given as strings but the model holds no trainable text encoder")
            text_states, text_mask = self.text_encoder(captions)
        if text_states is not None:
            out["text_feat"] = self.embed_text_states(text_states, text_mask)
            if self.bnneck_per_modality:  # batch statistics of each modality on its own
                out["image_neck"] = self.head.bnneck(out["image_feat"])
                out["text_neck"] = self.head.bnneck(out["text_feat"])
                neck = torch.cat([out["image_neck"], out["text_neck"]])
            else:
                neck = self.head.bnneck(torch.cat([out["image_feat"], out["text_feat"]]))
                out["image_neck"], out["text_neck"] = neck.split(len(images))
        else:
            neck = out["image_neck"] = self.head.bnneck(out["image_feat"])
        logits = self.head.classifier(neck)
        if text_states is not None:
            out["image_logits"], out["text_logits"] = logits.split(len(images))
        else:
            out["image_logits"] = logits
        return out


def build_model(
    cfg: Config,
    num_classes: int,
    *,
    with_text: bool | None = None,
    pretrained: bool = True,
    text_dim: int | None = None,
) -> DMFModel:
    """The model described by ``cfg``.

    ``with_text`` (default: ``fusion.mode == "shared"``) adds the caption path; fine-tuning and
    evaluation build without it. ``text_dim`` is the width of the caption token states when the
    caller knows it (default: read from the text encoder's config). ``pretrained`` loads
    ``model.image.pretrained`` into the ViT when set.
    A trainable text encoder (``model.text.freeze: false``) is built into the model (imports transformers).
    """
    img = cfg.model.image
    vit = VisionTransformer(
        height=img.height, width=img.width, patch=img.patch, stride=img.stride,
        dim=img.dim, depth=img.depth, heads=img.heads, drop_path=img.drop_path,
    )
    if pretrained and img.pretrained:
        load_pretrained(vit, img.pretrained)
    if with_text is None:
        with_text = cfg.fusion.mode == "shared"
    text_encoder = None
    if not with_text:
        text_dim = None
    else:
        from dmf_core.model.text import TextEncoder, text_hidden_size

        text_dim = text_dim or text_hidden_size(cfg.model.text.name)
        if not cfg.model.text.freeze:
            text_encoder = TextEncoder(cfg.model.text.name, cfg.model.text.max_length, freeze=False)
    fusion = FusionEncoder(
        dim=cfg.fusion.dim, layers=cfg.fusion.layers, heads=cfg.fusion.heads, mlp_ratio=cfg.fusion.mlp_ratio,
        image_tokens=vit.num_tokens, text_tokens=cfg.model.text.max_length if with_text else None,
        dropout=cfg.fusion.dropout, drop_path=cfg.fusion.drop_path,
    )
    return DMFModel(vit, fusion, num_classes, text_dim=text_dim, text_encoder=text_encoder,
                    bnneck_per_modality=cfg.fusion.bnneck == "per_modality",
                    image_mean=cfg.augment.mean, image_std=cfg.augment.std)
