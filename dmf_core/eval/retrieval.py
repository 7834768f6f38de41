"""Top-k retrieval with faiss (exact inner product on L2-normalised features).

``topk`` returns cosine distances (``1 - cos``, ascending) and gallery indices; equal scores come
back in faiss order. Reusable by a command-line search: build once with :func:`build_index`, query
with :func:`search`.
"""

from __future__ import annotations

import logging

import numpy as np

from dmf_core.eval.distances import as_tensor

log = logging.getLogger(__name__)


def _normalised(x, name: str) -> np.ndarray:
    import torch

    t = torch.nn.functional.normalize(as_tensor(x, name), dim=1)
    return np.ascontiguousarray(t.numpy(), dtype=np.float32)


def build_index(gallery_feats, *, normalise: bool = True):
    """A ``faiss.IndexFlatIP`` over the (normalised) gallery features."""
    import faiss

    g = _normalised(gallery_feats, "gallery features") if normalise else np.ascontiguousarray(
        as_tensor(gallery_feats, "gallery features").numpy())
    index = faiss.IndexFlatIP(g.shape[1])
    index.add(g)
    return index


def search(index, query_feats, k: int, *, normalise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(distances, indices)``, each ``num_query x min(k, index.ntotal)``, distance = ``1 - ip``."""
    if k < 1:
        raise ValueError(f"k: expected a positive integer, got {k}")
    q = _normalised(query_feats, "query features") if normalise else np.ascontiguousarray(
        as_tensor(query_feats, "query features").numpy())
    if q.shape[1] != index.d:
        raise ValueError(f"feature dimensions differ: query has {q.shape[1]}, index has {index.d}")
    k = min(int(k), int(index.ntotal))
    sims, idx = index.search(q, k)
    return (1.0 - sims).astype(np.float32), idx.astype(np.int64)


def topk(query_feats, gallery_feats, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest gallery items of every query by cosine distance: ``(distances, indices)``,
    both ``num_query x min(k, num_gallery)``, nearest first."""
    return search(build_index(gallery_feats), query_feats, k)
