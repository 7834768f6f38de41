"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) with the semantics of torchreid's ``re_ranking``.

Two entry points share one sparse core:

- :func:`k_reciprocal_rerank` takes the three distance blocks (query-gallery, query-query,
  gallery-gallery), builds the (q+g)^2 matrix exactly as the reference does (squared, normalised by
  each column's max, transposed; neighbours by ``np.argsort``), so it agrees with the reference to
  float rounding; memory grows as (q+g)^2, so it refuses up front when that cannot fit.
- :func:`rerank_from_features` never builds a dense (q+g)^2 matrix: faiss finds the k1+1 nearest
  neighbours (and each item's farthest one, for the normalisation), the k-reciprocal weights V are
  kept sparse, and the Jaccard distance is accumulated per query chunk from a column index of V.
  Only the query x gallery output is dense. It refuses up front (``RerankMemoryError``, naming the
  GiB needed) when the estimate exceeds the memory available.

Semantics (both): d <- d^2 / max_k d_k^2 per item; R(p, k1) = k-reciprocal neighbours among the
k1+1 nearest; expanded by R(c, round(k1/2)) of candidates c when more than 2/3 of it lies in R(p, k1);
V_p = exp(-d) on that set, normalised; local query expansion V_p <- mean of V over p's k2 nearest;
Jaccard d_J = 1 - m / (2 - m), m = sum_k min(V_p, V_g); final = (1 - lambda) d_J + lambda d.
"""

from __future__ import annotations

import logging

import numpy as np

from dmf_core.eval.distances import as_tensor, check_finite

log = logging.getLogger(__name__)

GIB = 2**30


class RerankMemoryError(MemoryError, ValueError):
    """Re-ranking would not fit in memory; the message states the GiB it would need."""


def available_memory_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil ships with the venv
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _check_memory(need: int, what: str, max_bytes: int | None) -> None:
    limit = available_memory_bytes() if max_bytes is None else int(max_bytes)
    log.info("%s: estimated peak %.2f GiB (limit %.2f GiB)", what, need / GIB, limit / GIB)
    if need > limit:
        raise RerankMemoryError(f"{what} needs about {need / GIB:.1f} GiB but only {limit / GIB:.1f} GiB "
                                "is available; use the sparse path (rerank_from_features), fewer items, "
                                "or a machine with more memory")


def _check_params(k1: int, k2: int, lambda_value: float, n: int) -> None:
    if k1 < 1 or k2 < 1:
        raise ValueError(f"k1 and k2 must be positive, got k1={k1}, k2={k2}")
    if k2 > k1 + 1:
        raise ValueError(f"k2={k2} must not exceed k1+1={k1 + 1}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must lie in [0, 1], got {lambda_value}")
    if n < 2:
        raise ValueError(f"query+gallery has {n} item(s); re-ranking needs at least 2")


# ------------------------------------------------------------------------------------------------
# The sparse core
# ------------------------------------------------------------------------------------------------


def _reciprocal(knn: np.ndarray, k: int, chunk: int = 4096) -> np.ndarray:
    """``knn[:, :k+1]`` with entries that are not k-reciprocal set to -1."""
    fwd = knn[:, : k + 1]
    out = fwd.copy()
    for s in range(0, len(knn), chunk):
        f = fwd[s:s + chunk]
        back = fwd[f]  # c x (k+1) x (k+1)
        ok = (back == np.arange(s, s + len(f))[:, None, None]).any(-1)
        out[s:s + chunk][~ok] = -1
    return out


def _expansion_sets(knn: np.ndarray, k1: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr, indices sorted per row) of the expanded k-reciprocal set of every item."""
    h = int(np.around(k1 / 2.0))
    R = _reciprocal(knn, k1)          # N x (k1+1), -1 = not reciprocal
    H = _reciprocal(knn, h)           # N x (h+1)
    H_len = (H >= 0).sum(1)
    N = len(knn)
    rows_all, cols_all = [], []
    for s in range(0, N, chunk):
        r = R[s:s + chunk]
        c = len(r)
        cand = np.where(r >= 0, r, 0)
        hc = H[cand]  # c x (k1+1) x (h+1)
        rr = np.where(r >= 0, r, -2)
        inter = ((hc[..., None] == rr[:, None, None, :]) & (hc[..., None] >= 0)).any(-1).sum(-1)
        accept = (r >= 0) & (inter > (2.0 / 3.0) * H_len[cand])
        extra = np.where(accept[..., None], hc, -1).reshape(c, -1)
        members = np.concatenate([r, extra], axis=1)
        rows = np.repeat(np.arange(s, s + c), members.shape[1])
        flat = members.ravel()
        keep = flat >= 0
        rows_all.append(rows[keep])
        cols_all.append(flat[keep])
    rows = np.concatenate(rows_all)
    cols = np.concatenate(cols_all).astype(np.int64)
    key = np.unique(rows.astype(np.int64) * N + cols)
    rows, cols = key // N, key % N
    indptr = np.zeros(N + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=N), out=indptr[1:])
    return indptr, cols


def _row_ids(indptr: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))


def _weights(indptr, cols, dist_pairs) -> np.ndarray:
    """V values: exp(-d(i, j)) normalised per row, float32."""
    rows = _row_ids(indptr)
    w = np.exp(-dist_pairs(rows, cols)).astype(np.float32)
    sums = np.add.reduceat(w, indptr[:-1]) if len(w) else np.zeros(0, np.float32)
    counts = np.diff(indptr)
    sums = np.where(counts > 0, sums, 1.0).astype(np.float32)
    return (w / np.repeat(sums, counts)).astype(np.float32)


def _query_expansion(indptr, cols, vals, knn, k2, chunk: int = 4096):
    """V_i <- mean of V over rows knn[i, :k2] (sparse, CSR in and out)."""
    N = len(indptr) - 1
    nbr = knn[:, :k2]
    k2 = nbr.shape[1]  # fewer items than k2: the mean over what exists, as the reference
    lens = np.diff(indptr)
    out_ptr, out_cols, out_vals = [0], [], []
    for s in range(0, N, chunk):
        nb = nbr[s:s + chunk]                               # c x k2
        c = len(nb)
        src_rows = nb.ravel()
        n_each = lens[src_rows]
        owner = np.repeat(np.repeat(np.arange(c), k2), n_each)
        starts = np.repeat(indptr[src_rows], n_each)
        offs = np.arange(n_each.sum()) - np.repeat(np.cumsum(n_each) - n_each, n_each)
        pos = starts + offs
        key = owner.astype(np.int64) * N + cols[pos]
        ukey, inv = np.unique(key, return_inverse=True)
        summed = np.bincount(inv, weights=vals[pos].astype(np.float64), minlength=len(ukey))
        own = ukey // N
        out_cols.append(ukey % N)
        out_vals.append((summed / k2).astype(np.float32))
        out_ptr.extend((out_ptr[-1] + np.cumsum(np.bincount(own, minlength=c))).tolist())
    return (np.asarray(out_ptr, dtype=np.int64), np.concatenate(out_cols), np.concatenate(out_vals))


def _jaccard_into(out: np.ndarray, indptr, cols, vals, nq: int, lambda_value: float, chunk: int = 64) -> None:
    """out (nq x ng, holding lambda-free original distances) <- (1-l) d_J + l * out."""
    N = len(indptr) - 1
    ng = N - nq
    # column index of V restricted to gallery rows
    g_start = indptr[nq]
    g_rows = _row_ids(indptr)[g_start:] - nq
    g_cols = cols[g_start:]
    g_vals = vals[g_start:]
    order = np.argsort(g_cols, kind="stable")
    csc_rows, csc_vals = g_rows[order], g_vals[order]
    csc_ptr = np.zeros(N + 1, dtype=np.int64)
    np.cumsum(np.bincount(g_cols, minlength=N), out=csc_ptr[1:])
    col_len = np.diff(csc_ptr)
    for s in range(0, nq, chunk):
        e = min(nq, s + chunk)
        a, b = indptr[s], indptr[e]
        q_rows = _row_ids(indptr[s:e + 1] - a)           # local query row of each entry
        q_cols, q_vals = cols[a:b], vals[a:b]
        n_each = col_len[q_cols]
        total = int(n_each.sum())
        owner = np.repeat(q_rows, n_each)
        starts = np.repeat(csc_ptr[q_cols], n_each)
        offs = np.arange(total) - np.repeat(np.cumsum(n_each) - n_each, n_each)
        pos = starts + offs
        mins = np.minimum(np.repeat(q_vals, n_each), csc_vals[pos])
        m = np.bincount(owner.astype(np.int64) * ng + csc_rows[pos], weights=mins,
                        minlength=(e - s) * ng).reshape(e - s, ng).astype(np.float32)
        jac = 1 - m / (2.0 - m)
        out[s:e] = jac * np.float32(1 - lambda_value) + out[s:e] * np.float32(lambda_value)


def _core(knn: np.ndarray, dist_pairs, out: np.ndarray, nq: int, k1: int, k2: int, lambda_value: float):
    indptr, cols = _expansion_sets(knn, k1)
    vals = _weights(indptr, cols, dist_pairs)
    if k2 != 1:
        indptr, cols, vals = _query_expansion(indptr, cols, vals, knn, k2)
    _jaccard_into(out, indptr, cols, vals, nq, lambda_value)
    return out


# ------------------------------------------------------------------------------------------------
# Dense entry point (reference semantics)
# ------------------------------------------------------------------------------------------------


def _dist_array(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D distance matrix, got shape {arr.shape}")
    check_finite(arr, name)
    return arr


def k_reciprocal_rerank(q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                        *, max_memory_bytes: int | None = None) -> np.ndarray:
    """Re-ranked query x gallery distances (float32) from the three distance blocks, as torchreid's
    ``re_ranking`` (agrees to float rounding). Memory ~ 24 bytes x (q+g)^2: refuses up front with
    ``RerankMemoryError`` when that exceeds the available memory."""
    qg = _dist_array(q_g_dist, "q_g_dist")
    qq = _dist_array(q_q_dist, "q_q_dist")
    gg = _dist_array(g_g_dist, "g_g_dist")
    nq, ng = qg.shape
    if nq == 0 or ng == 0:
        raise ValueError(f"q_g_dist: empty query or gallery (shape {qg.shape})")
    if qq.shape != (nq, nq):
        raise ValueError(f"q_q_dist: expected shape ({nq}, {nq}) to match q_g_dist {qg.shape}, got {qq.shape}")
    if gg.shape != (ng, ng):
        raise ValueError(f"g_g_dist: expected shape ({ng}, {ng}) to match q_g_dist {qg.shape}, got {gg.shape}")
    N = nq + ng
    _check_params(k1, k2, lambda_value, N)
    _check_memory(24 * N * N, f"dense re-ranking of {nq}+{ng} items", max_memory_bytes)
    full = np.concatenate([np.concatenate([qq, qg], axis=1), np.concatenate([qg.T, gg], axis=1)], axis=0)
    full = np.power(full, 2).astype(np.float32)
    full = np.transpose(1.0 * full / np.max(full, axis=0))
    knn = np.argsort(full)[:, : k1 + 1].astype(np.int64)  # same call as the reference: same tie order
    out = np.ascontiguousarray(full[:nq, nq:], dtype=np.float32)
    return _core(knn, lambda r, c: full[r, c], out, nq, k1, k2, lambda_value)


# ------------------------------------------------------------------------------------------------
# Sparse entry point from features
# ------------------------------------------------------------------------------------------------


def estimate_sparse_bytes(nq: int, ng: int, k1: int = 20, k2: int = 6) -> int:
    """Peak memory estimate of :func:`rerank_from_features` (bytes)."""
    N = nq + ng
    per_row = (k1 + 1) * (1 + int(np.around(k1 / 2.0)))   # worst-case expanded set size
    v_entries = N * min(N, per_row)
    qe_entries = N * min(N, k2 * per_row // 2)
    return int(4 * nq * ng * 1.1 + 24 * qe_entries * 2 + 16 * v_entries + 64 * N * (k1 + 1) + 512 * 2**20)


def rerank_from_features(query_feats, gallery_feats, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, *,
                         metric: str = "cosine", max_memory_bytes: int | None = None) -> np.ndarray:
    """Re-ranked query x gallery distances from features, without a dense (q+g)^2 matrix.

    Same result as ``k_reciprocal_rerank(d(q,g), d(q,q), d(g,g))`` with ``d`` the ``metric`` distance
    (``"cosine"`` = 1 - cos, the protocol's; ``"euclidean"`` = squared), up to neighbour ties."""
    import faiss
    import torch

    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric: expected 'cosine' or 'euclidean', got {metric!r}")
    q = as_tensor(query_feats, "query features")
    g = as_tensor(gallery_feats, "gallery features")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"feature dimensions differ: query has {q.shape[1]}, gallery has {g.shape[1]}")
    nq, ng = q.shape[0], g.shape[0]
    N = nq + ng
    _check_params(k1, k2, lambda_value, N)
    _check_memory(estimate_sparse_bytes(nq, ng, k1, k2),
                  f"sparse re-ranking of {nq} queries x {ng} gallery items", max_memory_bytes)
    x = torch.cat([q, g])
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    xn = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    sq = (xn.astype(np.float64) ** 2).sum(1).astype(np.float32)

    def pair_d(a_idx, b_idx, chunk=1 << 16):
        out = np.empty(len(a_idx), dtype=np.float32)
        for s in range(0, len(a_idx), chunk):
            a, b = a_idx[s:s + chunk], b_idx[s:s + chunk]
            ip = np.einsum("ij,ij->i", xn[a], xn[b])
            out[s:s + chunk] = (1.0 - ip) if metric == "cosine" else np.maximum(sq[a] + sq[b] - 2 * ip, 0)
        return out

    # k1+1 nearest neighbours of every item, and the per-item max distance (for the normalisation)
    if metric == "cosine":
        index = faiss.IndexFlatIP(xn.shape[1])
        index.add(xn)
        _, knn = index.search(xn, min(k1 + 1, N))
        far_ip, _ = index.search(-xn, 1)
        maxd = (1.0 + far_ip[:, 0]).astype(np.float32)  # 1 - min ip
    else:
        index = faiss.IndexFlatL2(xn.shape[1])
        index.add(xn)
        _, knn = index.search(xn, min(k1 + 1, N))
        xt = torch.from_numpy(xn)
        sqt = torch.from_numpy(sq)
        maxd = np.concatenate([
            torch.addmm(sqt[None], xt[s:s + 1024], xt.T, alpha=-2).add_(sqt[s:s + 1024, None]).clamp_(min=0)
            .max(1).values.numpy() for s in range(0, N, 1024)])
    maxd2 = np.maximum(maxd.astype(np.float32) ** 2, np.float32(1e-12))
    knn = knn.astype(np.int64)
    # faiss may not put the item itself first on exact duplicates; the reference argsort would
    self_pos = knn == np.arange(N)[:, None]

    def dist_pairs(r, c):
        return pair_d(r, c) ** 2 / maxd2[r]

    out = np.empty((nq, ng), dtype=np.float32)
    qt, gt = torch.from_numpy(xn[:nq]), torch.from_numpy(xn[nq:])
    for s in range(0, nq, 1024):
        e = min(nq, s + 1024)
        ip = qt[s:e] @ gt.T
        if metric == "cosine":
            d = torch.sub(1.0, ip)
        else:
            d = (torch.from_numpy(sq[s:e])[:, None] + torch.from_numpy(sq[nq:])[None] - 2 * ip).clamp_(min=0)
        out[s:e] = (d.numpy() ** 2) / maxd2[s:e, None]
    log.debug("rerank: %d self-first rows of %d", int(self_pos[:, 0].sum()), N)
    return _core(knn, dist_pairs, out, nq, k1, k2, lambda_value)
