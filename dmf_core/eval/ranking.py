"""CMC, mAP and mINP under the Market-1501 protocol: exact, chunked, no compiled extension.

Protocol (torchreid ``eval_market1501``; mINP as fast-reid):

- smaller distance = closer; for each query, gallery items with the same pid **and** the same camera
  are removed; a query left with no true match is skipped (not counted in ``num_valid``); pid 0
  distractors stay in the gallery as negatives (junk pid -1 is dropped before evaluation);
- **ties**: equal distances are ordered by gallery index (a stable sort), so results never depend on
  a sort implementation;
- ``cmc[k-1]`` is the fraction of valid queries with a true match within the first k kept items;
  ``cmc`` always has ``max_rank`` entries (past the gallery size it stays at its last value, 1.0);
- ``AP = mean over true matches m of (#matches ranked <= m) / rank(m)``; ``INP = #matches / rank(last
  match)``.

How: a query's metrics depend only on the ranks of its true matches among the kept items, and
``rank(m) = #{kept j : d_j < d_m}`` when no kept negative ties with a match. So each row costs one
comparison with the farthest match plus a binary search of the (few) closer items among the sorted
match distances, instead of a full argsort; rows where a match ties with another item take the
exact stable-argsort path. Queries are processed in chunks, so :func:`evaluate_features` never holds
more than ``chunk x num_gallery`` distances (MSMT17-sized sets in bounded memory).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from dmf_core.eval.distances import check_finite, iter_distance_chunks

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 256


@dataclass
class RankResult:
    """CMC (fractions, length ``max_rank``), mAP and mINP (0-1), and how many queries counted."""

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid: int
    num_query: int = 0
    num_gallery: int = 0
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """rank-1/5/10, mAP, mINP in percent (2 dp), the keys the metrics JSON uses."""
        pick = {k: round(100.0 * float(self.cmc[min(k, len(self.cmc)) - 1]), 2) for k in (1, 5, 10)}
        return {"rank1": pick[1], "rank5": pick[5], "rank10": pick[10],
                "mAP": round(100.0 * self.mAP, 2), "mINP": round(100.0 * self.mINP, 2)}


def _ids(x, name: str) -> np.ndarray:
    arr = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        check_finite(arr, name)
        if not np.all(arr == np.round(arr)):
            raise ValueError(f"{name}: expected integer ids, got non-integer floats")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"{name}: expected integer ids, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_ids(num_q: int, num_g: int, q_pids, g_pids, q_camids, g_camids, max_rank: int):
    if num_q == 0:
        raise ValueError("empty query set (0 queries)")
    if num_g == 0:
        raise ValueError("empty gallery set (0 gallery items)")
    if not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
        raise ValueError(f"max_rank: expected a positive integer, got {max_rank!r}")
    arrays = {"q_pids": _ids(q_pids, "q_pids"), "g_pids": _ids(g_pids, "g_pids"),
              "q_camids": _ids(q_camids, "q_camids"), "g_camids": _ids(g_camids, "g_camids")}
    for name, want in (("q_pids", num_q), ("q_camids", num_q), ("g_pids", num_g), ("g_camids", num_g)):
        if len(arrays[name]) != want:
            side = "queries" if name.startswith("q") else "gallery items"
            raise ValueError(f"{name}: length {len(arrays[name])} does not match the {want} {side} "
                             "of the distances/features")
    return arrays["q_pids"], arrays["g_pids"], arrays["q_camids"], arrays["g_camids"]


class _Accumulator:
    """Sums per-query results; ``first`` = 0-based kept rank of the first match of each valid query."""

    def __init__(self, max_rank: int):
        self.max_rank = max_rank
        self.first_hist = np.zeros(max_rank + 1, dtype=np.int64)  # last bin: first match beyond max_rank
        self.ap_sum = 0.0
        self.inp_sum = 0.0
        self.num_valid = 0
        self.slow_rows = 0

    def add(self, ranks: np.ndarray) -> None:
        """``ranks``: sorted 0-based kept ranks of all true matches of one query (non-empty)."""
        n = len(ranks)
        self.first_hist[min(int(ranks[0]), self.max_rank)] += 1
        self.ap_sum += float(np.sum(np.arange(1, n + 1, dtype=np.float64) / (ranks + 1.0)) / n)
        self.inp_sum += n / (float(ranks[-1]) + 1.0)
        self.num_valid += 1

    def result(self, num_q: int, num_g: int, where: str) -> RankResult:
        if self.num_valid == 0:
            raise ValueError(f"no valid query: none of the {num_q} queries has a true match in the gallery "
                             f"({where}); check that query and gallery share identities on other cameras")
        cmc = np.cumsum(self.first_hist[:self.max_rank]).astype(np.float64) / self.num_valid
        return RankResult(cmc=cmc.astype(np.float32), mAP=self.ap_sum / self.num_valid,
                          mINP=self.inp_sum / self.num_valid, num_valid=self.num_valid,
                          num_query=num_q, num_gallery=num_g, extra={"tie_rows": self.slow_rows})


def _slow_row(row: np.ndarray, match: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Exact reference path for one row: stable argsort, drop removed, positions of matches."""
    order = np.argsort(row, kind="stable")
    kept_match = match[order][keep[order]]
    return np.flatnonzero(kept_match)


def _rank_rows(block: np.ndarray, q_pid: np.ndarray, q_cam: np.ndarray, g_pids: np.ndarray,
               g_camids: np.ndarray, acc: _Accumulator) -> None:
    """Accumulate one chunk of rows (``block``: len(q_pid) x num_gallery distances)."""
    same_pid = g_pids[None, :] == q_pid[:, None]
    has_pid = same_pid.any(1)
    for r in np.flatnonzero(has_pid):
        row = block[r]
        sp = same_pid[r]
        idx = np.flatnonzero(sp)
        other_cam = g_camids[idx] != q_cam[r]
        pos_idx = idx[other_cam]
        if len(pos_idx) == 0:
            continue
        rem_idx = idx[~other_cam]
        pos_d = np.sort(row[pos_idx])
        far = pos_d[-1]
        cand = row[row <= far]  # the only items that can precede a match
        right = np.searchsorted(pos_d, cand, side="right")
        # ties: a non-match item equal to a match distance (or matches equal among themselves)
        nz = right > 0
        eq = int(np.count_nonzero(pos_d[right[nz] - 1] == cand[nz]))
        if eq != len(pos_idx) or (len(pos_d) > 1 and np.any(pos_d[1:] == pos_d[:-1])):
            acc.slow_rows += 1
            match = sp & (g_camids != q_cam[r])
            keep = ~(sp & (g_camids == q_cam[r]))
            acc.add(_slow_row(row, match, keep))
            continue
        n_lt = np.cumsum(np.bincount(right, minlength=len(pos_d) + 1))[:len(pos_d)]
        if len(rem_idx):
            rem_right = np.searchsorted(pos_d, row[rem_idx], side="right")
            n_lt = n_lt - np.cumsum(np.bincount(rem_right, minlength=len(pos_d) + 1))[:len(pos_d)]
        acc.add(n_lt)


def _chunk_size(chunk: int | None, num_g: int) -> int:
    if chunk is None:  # ~64 MB of float32 distances per chunk
        return int(max(1, min(4096, (16 * 2**20) // max(1, num_g))))
    if chunk < 1:
        raise ValueError(f"chunk: expected a positive number of query rows, got {chunk}")
    return int(chunk)


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50, *,
                  chunk: int | None = None) -> RankResult:
    """CMC / mAP / mINP from a query x gallery distance matrix (numpy or tensor, any float dtype).

    Equals torchreid's ``evaluate_rank(..., use_cython=False)`` on tie-free inputs (and orders ties
    by gallery index). Raises ``ValueError`` on mismatched shapes, NaN/inf, an empty set, or when
    no query has a true match."""
    if isinstance(distmat, torch.Tensor):
        distmat = distmat.detach().cpu().numpy()
    distmat = np.asarray(distmat)
    if distmat.ndim != 2:
        raise ValueError(f"distmat: expected a 2-D query x gallery array, got shape {distmat.shape}")
    if distmat.dtype.kind not in "fiu":
        raise ValueError(f"distmat: expected a numeric array, got dtype {distmat.dtype}")
    num_q, num_g = distmat.shape
    q_pids, g_pids, q_camids, g_camids = _check_ids(num_q, num_g, q_pids, g_pids, q_camids, g_camids,
                                                    max_rank)
    acc = _Accumulator(int(max_rank))
    step = _chunk_size(chunk, num_g)
    for start in range(0, num_q, step):
        block = distmat[start:start + step]
        check_finite(block, f"distmat rows {start}-{start + len(block) - 1}")
        _rank_rows(block, q_pids[start:start + step], q_camids[start:start + step], g_pids, g_camids, acc)
    return acc.result(num_q, num_g, "evaluate_rank")


def evaluate_features(query_feats, gallery_feats, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50,
                      metric: str = "cosine", chunk: int | None = None) -> RankResult:
    """CMC / mAP / mINP straight from features: distances of one query chunk at a time (torch,
    float32), ranked and accumulated; the full query x gallery matrix is never built.

    ``metric``: ``"cosine"`` (``1 - cos``, the protocol's) or ``"euclidean"`` (squared)."""
    num_q = int(query_feats.shape[0]) if hasattr(query_feats, "shape") else len(query_feats)
    num_g = int(gallery_feats.shape[0]) if hasattr(gallery_feats, "shape") else len(gallery_feats)
    q_pids, g_pids, q_camids, g_camids = _check_ids(num_q, num_g, q_pids, g_pids, q_camids, g_camids,
                                                    max_rank)
    acc = _Accumulator(int(max_rank))
    step = _chunk_size(chunk, num_g)
    for start, block in iter_distance_chunks(query_feats, gallery_feats, metric, step):
        sl = slice(start, start + block.shape[0])
        _rank_rows(block.numpy(), q_pids[sl], q_camids[sl], g_pids, g_camids, acc)
    return acc.result(num_q, num_g, "evaluate_features")


def evaluate_rank_argsort(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50) -> RankResult:
    """The plain vectorised baseline: one full stable argsort and match matrix (O(q x g) memory).
    Kept for the benchmark and as a cross-check; prefer :func:`evaluate_rank`."""
    distmat = np.asarray(distmat)
    num_q, num_g = distmat.shape
    q_pids, g_pids, q_camids, g_camids = _check_ids(num_q, num_g, q_pids, g_pids, q_camids, g_camids,
                                                    max_rank)
    order = np.argsort(distmat, axis=1, kind="stable")
    same_pid = g_pids[order] == q_pids[:, None]
    same_cam = g_camids[order] == q_camids[:, None]
    keep = ~(same_pid & same_cam)
    match = same_pid & ~same_cam
    acc = _Accumulator(int(max_rank))
    for i in range(num_q):
        pos = np.flatnonzero(match[i][keep[i]])
        if len(pos):
            acc.add(pos)
    return acc.result(num_q, num_g, "evaluate_rank_argsort")
