"""Re-ID losses: label-smoothed ID cross-entropy, batch-hard triplet, image-caption InfoNCE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmf_core.config import Config


def id_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix (N, N), clamped away from 0 so the sqrt has a finite gradient."""
    x = x.float()
    sq = x.pow(2).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * x @ x.t()
    return d2.clamp_min(1e-12).sqrt()


def triplet_loss(feats: torch.Tensor, labels: torch.Tensor, margin: float | None = None) -> torch.Tensor:
    """Batch-hard triplet: hardest positive vs hardest negative per anchor.

    ``margin=None`` is the soft margin, log(1 + exp(d_ap - d_an)); otherwise max(0, d_ap - d_an + margin).
    Anchors without a positive or a negative in the batch are left out.
    """
    dist = pairwise_distance(feats)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos = same & ~eye
    neg = ~same
    d_ap = dist.masked_fill(~pos, float("-inf")).amax(1)
    d_an = dist.masked_fill(~neg, float("inf")).amin(1)
    valid = (pos.any(1) & neg.any(1)).float()
    diff = torch.where(valid.bool(), d_ap - d_an, torch.zeros_like(d_ap))
    per_anchor = F.softplus(diff) if margin is None else F.relu(diff + margin)
    return (per_anchor * valid).sum() / valid.sum().clamp_min(1.0)


def align_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, labels: torch.Tensor,
               temperature: float = 0.07) -> torch.Tensor:
    """Symmetric, identity-aware InfoNCE between images and captions.

    Every caption of the same identity is a positive (the batch holds K images of each identity,
    so pairing only an image with its own caption would push same-identity pairs apart).
    """
    img = F.normalize(image_feat.float(), dim=1)
    txt = F.normalize(text_feat.float(), dim=1)
    logits = img @ txt.t() / temperature
    pos = (labels[:, None] == labels[None, :]).float()
    pos = pos / pos.sum(1, keepdim=True)
    i2t = -(pos * logits.log_softmax(1)).sum(1).mean()
    t2i = -(pos.t() * logits.t().log_softmax(1)).sum(1).mean()
    return 0.5 * (i2t + t2i)


def dmf_losses(out: dict[str, torch.Tensor], labels: torch.Tensor, cfg: Config) -> dict[str, torch.Tensor]:
    """Weighted losses of one batch: ``loss`` (the total) plus ``id_loss``, ``triplet_loss``, ``align_loss``.

    With captions (``fusion.mode=shared``) the ID loss and the triplet run over images and captions
    together, with the same labels, so both modalities share one identity space.
    """
    lc = cfg.loss
    key = "feat" if lc.triplet_feature == "f" else "neck"
    if "text_feat" in out:
        feats = torch.cat([out[f"image_{key}"], out[f"text_{key}"]])
        logits = torch.cat([out["image_logits"], out["text_logits"]])
        all_labels = torch.cat([labels, labels])
    else:
        feats, logits, all_labels = out[f"image_{key}"], out["image_logits"], labels
    if "text_feat" in out and lc.triplet_scope == "within":
        triplet = 0.5 * (triplet_loss(out[f"image_{key}"], labels, lc.triplet_margin)
                         + triplet_loss(out[f"text_{key}"], labels, lc.triplet_margin))
    elif "text_feat" in out and lc.triplet_scope == "images":
        triplet = triplet_loss(out[f"image_{key}"], labels, lc.triplet_margin)
    else:
        triplet = triplet_loss(feats, all_labels, lc.triplet_margin)
    losses = {"id_loss": id_loss(logits, all_labels, lc.label_smoothing), "triplet_loss": triplet}
    if "text_feat" in out and cfg.fusion.align_weight > 0:
        losses["align_loss"] = align_loss(out["image_feat"], out["text_feat"], labels)
    else:
        losses["align_loss"] = feats.new_zeros(())
    losses["loss"] = (lc.id_weight * losses["id_loss"] + lc.triplet_weight * losses["triplet_loss"]
                      + cfg.fusion.align_weight * losses["align_loss"])
    return losses
