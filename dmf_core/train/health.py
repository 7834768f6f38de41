"""Feature health, measured at the end of a training stage on images it did not train on.

A collapsed feature space has every image pointing the same way: the mean cosine between images
of different identities goes to 1 and ranked lists turn into near-ties. The numbers here say
whether that happened (docs/training.md, "What collapsed, and the fix"):

* ``cosine_other_id`` / ``cosine_same_id``: mean cosine of f between images of different / of
  the same identity (pairs of distinct images);
* ``caption_to_image_mAP``: with captions, each held-out image's caption as a query against the
  other held-out images (is there a common space at all?); the image the caption describes is
  left out, so a caption cannot score by matching its own picture.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: At most this many images enter the pairwise statistics (a fixed, spread-out subset).
MAX_IMAGES = 1024


def spread_subset(n: int, limit: int = MAX_IMAGES) -> np.ndarray:
    """Indices 0..n-1, thinned evenly to at most ``limit`` (deterministic)."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def cosine_statistics(feats: torch.Tensor, pids: np.ndarray) -> dict[str, float]:
    """Mean cosine between distinct images of the same identity and of different identities."""
    f = F.normalize(feats.double(), dim=1)
    cos = f @ f.t()
    pids_t = torch.as_tensor(np.asarray(pids))
    same = pids_t[:, None] == pids_t[None, :]
    eye = torch.eye(len(pids_t), dtype=torch.bool)
    same_pairs, other_pairs = same & ~eye, ~same
    out = {"cosine_other_id": float(cos[other_pairs].mean()) if other_pairs.any() else float("nan"),
           "cosine_same_id": float(cos[same_pairs].mean()) if same_pairs.any() else float("nan")}
    return {k: round(v, 4) for k, v in out.items()}


def retrieval_map(query: torch.Tensor, query_pids: np.ndarray, gallery: torch.Tensor,
                  gallery_pids: np.ndarray, *, own_image_out: bool = False) -> float:
    """mAP (percent) of cosine retrieval with the evaluation's own ranker, every gallery entry of
    the query's identity a match. ``own_image_out``: query ``i`` describes gallery image ``i``,
    which is left out of its ranking (the protocol drops a same-pid, same-camera entry, and each
    index is its own camera here), so only the identity's *other* images count."""
    from dmf_core.eval.distances import cosine_distance
    from dmf_core.eval.ranking import evaluate_rank

    dist = cosine_distance(query.float(), gallery.float())
    q_pids, g_pids = np.asarray(query_pids), np.asarray(gallery_pids)
    if own_image_out:
        if len(q_pids) != len(g_pids) or (q_pids != g_pids).any():
            raise ValueError("own_image_out: query i must describe gallery image i")
        q_cams = g_cams = np.arange(len(q_pids), dtype=np.int64)
    else:
        q_cams, g_cams = np.zeros(len(q_pids), dtype=np.int64), np.ones(len(g_pids), dtype=np.int64)
    result = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=1)
    return round(100.0 * float(result.mAP), 2)


@torch.no_grad()
def embed(fn, loader, device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """f of every image of ``loader`` (test transforms) and their pids, on the CPU."""
    feats, pids = [], []
    for batch in loader:
        feats.append(fn(batch["image"].to(device)).float().cpu())
        pids.append(np.asarray(batch["pid"]))
    return torch.cat(feats), np.concatenate(pids)
