"""DMFModel and ``build_model(cfg, num_classes)``.

```
image ─► ViT ─► all output tokens ─► image_proj ─┐                      ┌► image BNNeck ─┐
                                                 ├─► FusionEncoder ─► f ─┤                ├─► classifier
caption ─► text encoder ─► tokens ─► text_proj ──┘      (shared)         └► text BNNeck ──┘
```
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dmf_core.config import Config
from dmf_core.model.fusion import IMAGE, TEXT, FusionEncoder
from dmf_core.model.heads import AlignHead, AttributeHead, BNNeckHead
from dmf_core.model.outputs import Branch, ModelOutput
from dmf_core.model.teacher import TeacherHead
from dmf_core.model.vit import VisionTransformer, load_pretrained

log = logging.getLogger(__name__)

# Parameters that are specific to one training stage and never carried into the next one.
CLASSIFIER_PREFIX = "head.classifier."
TEXT_PREFIXES = ("text_proj.", "text_encoder.", "fusion.text_pos", "head.text_bnneck.", "attribute_head.",
                 "align_head.", "teacher_head.")


@contextlib.contextmanager
def module_rng(seed: int | None, name: str):
    """Inside, the CPU RNG is seeded by (``seed``, ``name``); the RNG state outside is untouched.
    ``seed=None``: no effect. One stream per module, so adding or dropping a module (the text
    path of one arm) changes no other module's initial weights: arms are paired by seed."""
    if seed is None:
        yield
        return
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        yield


def _projection(in_dim: int, out_dim: int) -> nn.Linear:
    proj = nn.Linear(in_dim, out_dim)
    nn.init.trunc_normal_(proj.weight, std=0.02)
    nn.init.zeros_(proj.bias)
    return proj


class DMFModel(nn.Module):
    """Image encoder + (optional) text projection + shared fusion encoder + BNNeck head
    (+ the attribute head of the attribute-head control, when ``attribute_classes`` is given).

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
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        attribute_classes: Sequence[int] | None = None,
        init_seed: int | None = None,
        align_head: bool = False,
        teacher: dict | None = None,
    ) -> None:
        """``init_seed``: each module this creates draws its initial weights from its own stream,
        seeded by (``init_seed``, its name) (:func:`module_rng`), so that models with and without
        the text path or the attribute head start with the same image path. ``teacher``: the
        :class:`~dmf_core.model.teacher.TeacherHead`'s arguments (``fusion.mode: prototypes | phrases``)."""
        super().__init__()
        self.text_dim = int(text_dim) if text_dim else None
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.image_encoder = image_encoder
        with module_rng(init_seed, "image_proj"):
            self.image_proj = _projection(image_encoder.dim, fusion.dim)
        with module_rng(init_seed, "text_proj"):
            self.text_proj = _projection(text_dim, fusion.dim) if text_dim else None
        # Registered only when trainable (model.text.freeze=false); a frozen encoder lives in the
        # training loop's caption cache and is not part of the weights.
        self.text_encoder = text_encoder
        self.fusion = fusion
        with module_rng(init_seed, "head"):
            self.head = BNNeckHead(fusion.dim, num_classes, with_text=bool(text_dim))
        with module_rng(init_seed, "attribute_head"):
            self.attribute_head = AttributeHead(fusion.dim, list(attribute_classes)) if attribute_classes else None
        with module_rng(init_seed, "align_head"):  # fusion.align_on: head, with the text path only
            self.align_head = AlignHead(fusion.dim) if align_head and text_dim else None
        with module_rng(init_seed, "teacher_head"):
            self.teacher_head = TeacherHead(fusion.dim, **teacher) if teacher else None

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
        image_mean, image_std, attribute_classes)``. ``image_size`` (H, W) and ``feature_dim``
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
            "attribute_classes": (list(self.attribute_head.classes_per_attribute)
                                  if self.attribute_head is not None else None),
            "align_head": self.align_head is not None,
            "teacher": dict(self.teacher_head.init_kwargs) if self.teacher_head is not None else None,
            "image_encoder": dict(vit),
            "fusion": dict(self.fusion.init_kwargs),
            "text_encoder": dict(text) if text is not None else None,
        }

    def save_pretrained(self, out_dir: str | Path, *, cfg: Config, num_classes: int, stage: str,
                        extra: dict | None = None) -> dict:
        """Write ``model.safetensors``, ``config.json`` and ``meta.json`` to ``out_dir``; returns the
        metadata (:func:`dmf_core.model.pretrained.save_model`)."""
        from dmf_core.model.pretrained import save_model

        return save_model(self, out_dir, cfg=cfg, num_classes=num_classes, stage=stage, extra=extra)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[DMFModel, dict]:
        """The model a training stage wrote, weights loaded strictly, in eval mode, and its
        metadata (:func:`dmf_core.model.pretrained.load_model`)."""
        from dmf_core.model.pretrained import load_model

        return load_model(model_dir, device)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """f for a batch of images (B, 3, H, W): the fusion CLS output, before BNNeck."""
        return self.fusion(self.image_proj(self.image_encoder(images)), IMAGE)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """The test-time feature: BN(f) of the images' BNNeck (running statistics in eval mode).

        Not f itself: f carries a component common to every image (the fusion CLS before its
        LayerNorm), which leaves f of different people at cosine ~0.999; BN removes it
        (docs/training.md, "What collapsed, and the fix")."""
        return self.head.bnneck(self.encode_images(images))

    def encode_text_states(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """f for captions given their encoder token states (B, L, D_text) and mask (B, L)."""
        if self.text_proj is None:
            raise RuntimeError("this model has no text path (built with fusion.mode=image_only or for fine-tuning)")
        return self.fusion(self.text_proj(states), TEXT, mask)

    def embed_text_states(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The captions' feature in the common space: BN(f) of the captions' own BNNeck."""
        return self.head.text_bnneck(self.encode_text_states(states, mask))

    def forward(
        self,
        images: torch.Tensor,
        text_states: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        captions: Sequence[str] | None = None,
    ) -> ModelOutput:
        """Training forward: per modality f, BN(f) of its own BNNeck and the identity logits;
        the captions' branch when they are given, as token states (frozen text encoder) or as
        strings (trainable text encoder registered in this model)."""
        feat = self.encode_images(images)
        out = ModelOutput(image=Branch(feat, *self.head(feat)))
        if captions is not None:
            if self.text_encoder is None:
                raise RuntimeError("captions given as strings but the model holds no trainable text encoder")
            text_states, text_mask = self.text_encoder(captions)
        if text_states is not None:
            text_feat = self.encode_text_states(text_states, text_mask)
            out.text = Branch(text_feat, *self.head(text_feat, text=True))
            if self.align_head is not None:
                out.image.aligned = self.align_head(out.image.neck)
                out.text.aligned = self.align_head(out.text.neck, text=True)
        if self.attribute_head is not None:
            out.attributes = self.attribute_head(out.image.neck)
        if self.teacher_head is not None:
            logits = self.teacher_head(out.image.neck)
            out.teacher = self.teacher_head.split(logits) if self.teacher_head.groups else logits
        return out


def build_model(
    cfg: Config,
    num_classes: int,
    *,
    with_text: bool | None = None,
    pretrained: bool = True,
    text_dim: int | None = None,
    attribute_classes: Sequence[int] | None = None,
    teacher: dict | None = None,
) -> DMFModel:
    """The model described by ``cfg``.

    ``with_text`` (default: ``fusion.mode == "shared"``) adds the caption path; fine-tuning and
    evaluation build without it. ``text_dim`` is the width of the caption token states when the
    caller knows it (default: read from the text encoder's config). ``pretrained`` loads
    ``model.image.pretrained`` into the ViT when set. ``attribute_classes`` adds the attribute
    head (the attribute-head control of pretraining), ``teacher`` the teacher head's arguments
    (:func:`dmf_core.train.teacher.teacher_spec`). Every module's initial weights come from its
    own stream seeded by (``seed``, its name): one seed starts every arm's image path alike.
    A trainable text encoder (``model.text.freeze: false``) is built into the model (imports transformers).
    """
    img = cfg.model.image
    with module_rng(cfg.seed, "image_encoder"):
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
    with module_rng(cfg.seed, "fusion"):
        fusion = FusionEncoder(
            dim=cfg.fusion.dim, layers=cfg.fusion.layers, heads=cfg.fusion.heads, mlp_ratio=cfg.fusion.mlp_ratio,
            image_tokens=vit.num_tokens, text_tokens=cfg.model.text.max_length if with_text else None,
            dropout=cfg.fusion.dropout, drop_path=cfg.fusion.drop_path,
        )
    return DMFModel(vit, fusion, num_classes, text_dim=text_dim, text_encoder=text_encoder,
                    image_mean=cfg.augment.mean, image_std=cfg.augment.std,
                    attribute_classes=attribute_classes, init_seed=cfg.seed,
                    align_head=with_text and cfg.fusion.align_on == "head", teacher=teacher)
