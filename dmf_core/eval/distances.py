"""Feature validation, L2 normalisation and query x gallery distances, in torch, chunked.

- :func:`cosine_distance` is ``1 - <q, g>`` of the L2-normalised rows (0 = same direction, 2 = opposite):
  the distance of the evaluation protocol.
- :func:`euclidean_distance` is the *squared* Euclidean distance ``|q|^2 + |g|^2 - 2 q.g``, exactly what
  torchreid's ``compute_distance_matrix(..., "euclidean")`` returns (clamped at 0 against rounding).

Both take numpy arrays or tensors, compute in float32 over query chunks (so the peak extra memory
is one chunk of the product, not three full matrices) and return a float32 numpy array.
NaN or infinite values, wrong ranks or mismatched widths raise ``ValueError``.
"""

from __future__ import annotations

import numpy as np
import torch

DEFAULT_CHUNK = 1024
METRICS = ("cosine", "euclidean")


def as_tensor(x, name: str, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 2-D finite float tensor (CPU), or ``ValueError`` naming ``name`` and what was wrong."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (items x dims), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name}: empty (0 rows); need at least one item")
    if t.shape[1] == 0:
        raise ValueError(f"{name}: feature dimension is 0")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"{name}: expected a float array, got dtype {t.dtype}")
    t = t.to(device="cpu", dtype=dtype)
    check_finite(t, name)
    return t


def check_finite(x, name: str) -> None:
    """``ValueError`` if ``x`` (numpy array or tensor) holds NaN or +-inf, with how many and where."""
    if isinstance(x, torch.Tensor):
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            n = int(bad.sum())
            first = tuple(int(v) for v in torch.nonzero(bad)[0])
            raise ValueError(f"{name}: {n} NaN/infinite value(s), first at index {first}")
        return
    arr = np.asarray(x)
    if arr.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(v) for v in np.argwhere(bad)[0])
        raise ValueError(f"{name}: {int(bad.sum())} NaN/infinite value(s), first at index {first}")


def _pair(q, g) -> tuple[torch.Tensor, torch.Tensor]:
    qt, gt = as_tensor(q, "query features"), as_tensor(g, "gallery features")
    if qt.shape[1] != gt.shape[1]:
        raise ValueError(f"feature dimensions differ: query has {qt.shape[1]}, gallery has {gt.shape[1]}")
    return qt, gt


def cosine_chunk(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``1 - q g^T`` for already-normalised tensors (no checks): one chunk."""
    return torch.sub(1.0, q @ g.T)


def euclidean_chunk(q: torch.Tensor, g: torch.Tensor, g_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean ``|q|^2 + |g|^2 - 2 q g^T`` clamped at 0 (no checks): one chunk."""
    if g_sq is None:
        g_sq = (g * g).sum(1)
    d = torch.addmm(g_sq.unsqueeze(0), q, g.T, beta=1.0, alpha=-2.0)
    d.add_((q * q).sum(1, keepdim=True))
    return d.clamp_(min=0.0)


def iter_distance_chunks(q, g, metric: str = "cosine", chunk: int = DEFAULT_CHUNK):
    """Yield ``(start, block)`` with ``block`` the float32 tensor of distances of queries
    ``start:start+len(block)`` to every gallery item. Validates once, up front."""
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    if chunk < 1:
        raise ValueError(f"chunk: expected a positive number of query rows, got {chunk}")
    qt, gt = _pair(q, g)
    if metric == "cosine":
        qt = torch.nn.functional.normalize(qt, dim=1)
        gt = torch.nn.functional.normalize(gt, dim=1)
        g_sq = None
    else:
        g_sq = (gt * gt).sum(1)
    for start in range(0, qt.shape[0], chunk):
        qc = qt[start:start + chunk]
        yield start, (cosine_chunk(qc, gt) if metric == "cosine" else euclidean_chunk(qc, gt, g_sq))


def _full(q, g, metric: str, chunk: int) -> np.ndarray:
    qt = q if isinstance(q, torch.Tensor) else np.asarray(q)
    out = None
    for start, block in iter_distance_chunks(qt, g, metric, chunk):
        if out is None:
            out = np.empty((qt.shape[0], block.shape[1]), dtype=np.float32)
        out[start:start + block.shape[0]] = block.numpy()
    return out


def cosine_distance(q, g, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Query x gallery cosine distance ``1 - cos`` (rows are L2-normalised first), float32."""
    return _full(q, g, "cosine", chunk)


def euclidean_distance(q, g, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Query x gallery *squared* Euclidean distance (as torchreid), float32."""
    return _full(q, g, "euclidean", chunk)


def distance(q, g, metric: str = "cosine", chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """:func:`cosine_distance` or :func:`euclidean_distance` by name."""
    return _full(q, g, metric, chunk)
