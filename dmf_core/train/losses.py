"""Re-ID losses: label-smoothed ID cross-entropy, batch-hard triplet on normalised features, the
identity-aware image<->caption contrastive term, and the attribute head's cross-entropy.

Why this formulation (evidence in docs/training.md, "Does caption fusion make features transfer?"):
the triplet sees L2-normalised f (on BN(f) it transfers far worse); the contrastive term sees
the retrieval feature, BN(f) of each modality's own BNNeck, which removes the component common
to every image or every caption; captions have their own BNNeck (no statistics mixed across
modalities) and a bounded share of the ID loss, so the classifier cannot learn to read captions
instead of images; and the contrastive term is what pulls each image toward the captions of its
own identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmf_core.config import Config
from dmf_core.model.outputs import ModelOutput

#: What :func:`dmf_losses` returns besides the total ``loss``. The statistics are not loss terms:
#: ``triplets_satisfied``, the share of anchors past the margin (the hinge is 0 there);
#: ``triplets_ordered``, the share whose hardest negative is farther than their hardest positive
#: (every positive nearer than every negative: unlike the margin, blind to the scale of the
#: distances, which the shared component of f shrinks; docs/training.md, "The ratio triplet").
TERMS = ("id_loss", "triplet_loss", "align_loss", "attribute_loss", "teacher_loss")
STATS = ("triplets_satisfied", "triplets_ordered")


def id_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix (N, N) in fp32 even under autocast (with f's shared component
    the distances are far below bf16's rounding of the Gram matrix), clamped away from 0 so the
    sqrt has a finite gradient."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        sq = x.pow(2).sum(1)
        d2 = sq[:, None] + sq[None, :] - 2.0 * x @ x.t()
        return d2.clamp_min(1e-12).sqrt()


def batch_hard(feats: torch.Tensor, labels: torch.Tensor, feature: str = "f"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per anchor the hardest positive and hardest negative distance, and which anchors have
    both in the batch. ``feature``: ``f`` L2-normalised; ``centred`` less the batch mean, then
    normalised; ``raw`` as they are (BoT's triplet: distances in f's own scale)."""
    feats = feats.float()
    if feature == "centred":
        # the component every image shares carries no identity; left in, it shrinks every
        # distance after normalisation, and the loss sits at its margin (all points together)
        feats = feats - feats.mean(0, keepdim=True)
    dist = pairwise_distance(feats if feature == "raw" else F.normalize(feats, dim=1))
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos, neg = same & ~eye, ~same
    d_ap = dist.masked_fill(~pos, float("-inf")).amax(1)
    d_an = dist.masked_fill(~neg, float("inf")).amin(1)
    valid = pos.any(1) & neg.any(1)
    return d_ap, d_an, valid


def triplet_loss(feats: torch.Tensor, labels: torch.Tensor, margin: float | None = 0.3,
                 feature: str = "f", margin_type: str = "additive") -> torch.Tensor:
    """Batch-hard triplet (``feature``: see :func:`batch_hard`): max(0, g + margin), or the soft
    margin log(1 + exp(g)) with ``margin=None``, where g = d_ap - d_an (``additive``) or
    log d_ap - log d_an (``ratio``). Anchors without a positive or a negative in the batch are
    left out."""
    return _triplet(feats, labels, margin, feature, margin_type)[0]


def triplet_gap(d_ap: torch.Tensor, d_an: torch.Tensor, margin_type: str = "additive") -> torch.Tensor:
    """What the margin is added to: d_ap - d_an (``additive``) or log d_ap - log d_an (``ratio``);
    an anchor is satisfied when gap + margin <= 0."""
    # pairwise_distance keeps real distances >= 1e-6; an anchor without a positive or negative
    # has -inf / +inf here, which the caller's torch.where drops (its gradient is 0)
    if margin_type == "ratio":
        return d_ap.clamp_min(1e-6).log() - d_an.clamp_min(1e-6).log()
    return d_ap - d_an


def _triplet(feats: torch.Tensor, labels: torch.Tensor, margin: float | None, feature: str = "f",
             margin_type: str = "additive") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d_ap, d_an, valid = batch_hard(feats, labels, feature)
    diff = torch.where(valid, triplet_gap(d_ap, d_an, margin_type), torch.zeros_like(d_ap))
    per_anchor = F.softplus(diff) if margin is None else F.relu(diff + margin)
    n = valid.float().sum().clamp_min(1.0)
    loss = (per_anchor * valid.float()).sum() / n
    satisfied = ((diff + (margin or 0.0) <= 0) & valid).float().sum() / n
    ordered = ((diff < 0) & valid).float().sum() / n
    return loss, satisfied.detach(), ordered.detach()


def align_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, labels: torch.Tensor,
               temperature: float = 0.1) -> torch.Tensor:
    """Symmetric, identity-aware InfoNCE between images and captions (cosine / temperature).

    Every caption of the same identity is a positive of an image, and every image of the same
    identity a positive of a caption: the batch holds K images of each identity, so pairing an
    image only with its own caption would push same-identity pairs apart.
    """
    img = F.normalize(image_feat.float(), dim=1)
    txt = F.normalize(text_feat.float(), dim=1)
    logits = img @ txt.t() / temperature
    pos = (labels[:, None] == labels[None, :]).float()
    pos = pos / pos.sum(1, keepdim=True)
    i2t = -(pos * logits.log_softmax(1)).sum(1).mean()
    t2i = -(pos.t() * logits.t().log_softmax(1)).sum(1).mean()
    return 0.5 * (i2t + t2i)


def attribute_loss(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the attributes; ``targets`` (B, n_attributes) holds 0-based classes."""
    return torch.stack([F.cross_entropy(lg.float(), targets[:, i]) for i, lg in enumerate(logits)]).mean()


def dmf_losses(out: ModelOutput, labels: torch.Tensor, cfg: Config,
               attributes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Weighted losses of one batch: ``loss`` (the total), the :data:`TERMS` and the :data:`STATS`.

    The triplet runs over the images' f. With captions the ID loss is (1 - s) CE(images) +
    s CE(captions), s = ``loss.caption_id_share``, and the contrastive term links each image to
    the captions of its identity. With the attribute head, ``attributes`` holds its targets (the
    phrase teacher's too); the teacher head's term is weighted by ``fusion.teacher_weight``.
    """
    lc, zero = cfg.loss, out.image.feat.new_zeros(())
    ident = id_loss(out.image.logits, labels, lc.label_smoothing)
    align = zero
    if out.text is not None:
        share = lc.caption_id_share
        ident = (1 - share) * ident + share * id_loss(out.text.logits, labels, lc.label_smoothing)
        if cfg.fusion.align_weight > 0:
            image, text = (out.image.neck, out.text.neck) if out.text.aligned is None else (
                out.image.aligned, out.text.aligned)
            align = align_loss(image, text, labels, cfg.fusion.align_temperature)
    triplet, satisfied, ordered = _triplet(out.image.feat, labels, lc.triplet_margin, lc.triplet_feature,
                                           lc.triplet_margin_type)
    attr = zero
    if out.attributes is not None:
        if attributes is None:
            raise ValueError("the model has an attribute head but the batch holds no attribute targets")
        attr = attribute_loss(out.attributes, attributes)
    teacher = zero
    if isinstance(out.teacher, list):  # phrases: one softmax over its values' phrases per attribute
        if attributes is None:
            raise ValueError("the model's teacher scores attribute values but the batch holds no attribute targets")
        teacher = attribute_loss(out.teacher, attributes)
    elif out.teacher is not None:  # prototypes: the identities' caption embeddings as classes
        teacher = id_loss(out.teacher, labels, lc.label_smoothing)
    total = (lc.id_weight * ident + lc.triplet_weight * triplet + cfg.fusion.align_weight * align
             + lc.attribute_weight * attr + cfg.fusion.teacher_weight * teacher)
    return {"loss": total, "id_loss": ident, "triplet_loss": triplet, "align_loss": align,
            "attribute_loss": attr, "teacher_loss": teacher, "triplets_satisfied": satisfied,
            "triplets_ordered": ordered}
