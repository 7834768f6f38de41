"""CMC, mAP and mINP under the Market-1501 protocol: one exact, chunked ranker, no compiled extension.

Protocol (torchreid ``eval_market1501``; mINP as fast-reid):

- smaller distance = closer; for each query, gallery items with the same pid **and** the same camera
  are removed; a query left with no true match is skipped (not counted in ``num_valid``); pid 0
  distractors stay in the gallery as negatives; no pid is special here (junk pid -1 is dropped when
  the manifest is built, before evaluation);
- **ties**: a true match tied with a kept wrong-identity item ranks *after* it (matches tied among
  themselves are interchangeable). The result is the lowest over all orders of the tied items, the
  same for any gallery order, and favours no pid; on tie-free input it is torchreid's. From
  features, a float32 tie is first broken by the float64 distances of the tied items;
- ``cmc[k-1]`` is the fraction of valid queries with a true match within the first k kept items;
  ``cmc`` always has ``max_rank`` entries (past the gallery size it stays at its last value, 1.0);
- ``AP = mean over true matches m of (#matches ranked <= m) / rank(m)``; ``INP = #matches / rank(last
  match)``.

How: a query's metrics depend only on the 0-based ranks of its true matches among the kept items,
``rank(m_i) = i + #{kept wrong-identity j : d_j <= d_(m_i)}`` with the matches sorted by distance.
That count is ``#{all j : d_j <= d_m}`` (one vectorised comparison of the row per match, or a sort of
the row when a query has very many matches) minus the query's own same-pid items, which are few.
No ``num_query x num_gallery`` argsort is ever done. Queries are ranked in blocks of a few rows (the
block stays in cache across its comparisons), most matches first, so a block's rows share their
number of comparisons. :func:`evaluate_features` computes distances one query chunk at a time in
float32 and breaks a tie between a match and a wrong identity by their float64 distances.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from dmf_core.eval.distances import METRICS, as_tensor, check_finite, iter_distance_chunks

log = logging.getLogger(__name__)

BLOCK_BYTES = 2**20  # distances of one ranking block: stays in L2 across its comparisons
SORT_ABOVE = 96      # a row with more true matches than this is sorted once instead


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


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


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


def _chunk_size(chunk: int | None, num_g: int) -> int:
    if chunk is None:  # ~64 MB of float32 distances per chunk
        return int(max(1, min(4096, (16 * 2**20) // max(1, num_g))))
    if chunk < 1:
        raise ValueError(f"chunk: expected a positive number of query rows, got {chunk}")
    return int(chunk)


# ------------------------------------------------------------------------------------------------
# The protocol: each query's same-pid gallery items
# ------------------------------------------------------------------------------------------------


class _Protocol:
    """Per query, its same-pid gallery items (a slice of the pid-sorted gallery) and how many of
    them are true matches (another camera); the ranking order of the valid queries."""

    def __init__(self, q_pids, g_pids, q_camids, g_camids):
        self.q_camids, self.g_camids = q_camids, g_camids
        self.g_order = np.argsort(g_pids, kind="stable")
        pids_sorted = g_pids[self.g_order]
        self.lo = np.searchsorted(pids_sorted, q_pids, "left")
        self.n_same = np.searchsorted(pids_sorted, q_pids, "right") - self.lo
        row, col = self.items(np.arange(len(q_pids)))
        self.n_match = np.bincount(row[g_camids[col] != q_camids[row]], minlength=len(q_pids))
        valid = np.flatnonzero(self.n_match)
        # most matches first: rows of a block then share their number of comparisons
        self.order = valid[np.argsort(-self.n_match[valid], kind="stable")]

    def items(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in ``queries``, gallery index) of every same-pid item of those queries."""
        counts = self.n_same[queries]
        row = np.repeat(np.arange(len(queries)), counts)
        offset = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        return row, self.g_order[np.repeat(self.lo[queries], counts) + offset]


# ------------------------------------------------------------------------------------------------
# Ranking one block of rows
# ------------------------------------------------------------------------------------------------


def _count_le(block: np.ndarray, values: np.ndarray, n: np.ndarray, own_eq: np.ndarray | None = None):
    """``le[r, i] = #{j : block[r, j] <= values[r, i]}`` for ``i < n[r]``; with ``own_eq`` (how
    many of the row's own same-pid items equal ``values[r, i]``) also ``eq``, the same with ``==``
    (rows without extra equal items are not counted again). ``n`` must be non-increasing, so the
    rows of each comparison are a prefix."""
    le = np.zeros(values.shape, np.int64)
    eq = None if own_eq is None else own_eq.copy()
    n_sorted = int(np.count_nonzero(n > SORT_ABOVE))
    for r in range(n_sorted):  # many matches: one sort, then binary searches
        row = np.sort(block[r])
        le[r, :n[r]] = np.searchsorted(row, values[r, :n[r]], "right")
        if eq is not None:
            eq[r, :n[r]] = le[r, :n[r]] - np.searchsorted(row, values[r, :n[r]], "left")
    hit = np.empty(block.shape, bool)
    for i in range(int(n[n_sorted:].max(initial=0))):
        rows = slice(n_sorted, n_sorted + int(np.count_nonzero(n[n_sorted:] > i)))
        np.less_equal(block[rows], values[rows, i:i + 1], out=hit[rows])
        le[rows, i] = list(map(np.count_nonzero, hit[rows]))
        if eq is not None:
            np.equal(block[rows], values[rows, i:i + 1], out=hit[rows])
            if np.count_nonzero(hit[rows]) > eq[rows, i].sum():
                eq[rows, i] = list(map(np.count_nonzero, hit[rows]))
    return le, eq


@dataclass
class _Rows:
    """Per row of a block: 0-based kept rank of the first match, AP, INP; whether a float32 tie
    between a true match and a wrong identity was broken in float64, and whether an exact tie
    remained there (both only looked for from features)."""

    first: np.ndarray
    ap: np.ndarray
    inp: np.ndarray
    float64: np.ndarray
    tie: np.ndarray


Float64Distance = Callable[[int, np.ndarray], np.ndarray]


def _rank_block(block: np.ndarray, queries: np.ndarray, proto: _Protocol,
                float64_distance: Float64Distance | None = None) -> _Rows:
    """Metrics of the valid queries ``queries`` (in ``proto.order`` order) from their distance rows.
    With ``float64_distance(query, gallery_indices)``, ties of a true match with a wrong identity
    are broken by the float64 distance of just the tied items (see :func:`_break_ties`)."""
    row, col = proto.items(queries)
    val = block[row, col]
    is_match = proto.g_camids[col] != proto.q_camids[queries][row]
    order = np.lexsort((val, row))
    row, val, is_match = row[order], val[order], is_match[order]
    # among the query's own same-pid items: how many are <= (and ==) each one
    row_start = np.searchsorted(row, row, "left")
    new_run = np.r_[True, (row[1:] != row[:-1]) | (val[1:] != val[:-1])]
    run = np.cumsum(new_run) - 1
    run_end = np.searchsorted(run, run, "right")
    same_le = (run_end - row_start)[is_match]
    same_eq = (run_end - np.flatnonzero(new_run)[run])[is_match]

    n = proto.n_match[queries]
    m_row, m_val = row[is_match], val[is_match]
    i = np.arange(len(m_row)) - np.repeat(np.cumsum(n) - n, n)  # position among the row's matches
    values = np.zeros((len(queries), int(n.max())), block.dtype)
    values[m_row, i] = m_val
    own_eq = None
    if float64_distance is not None:
        own_eq = np.zeros(values.shape, np.int64)
        own_eq[m_row, i] = same_eq
    le, eq = _count_le(block, values, n, own_eq)
    rank = i + le[m_row, i] - same_le
    broken, tie = np.zeros(len(queries), bool), np.zeros(len(queries), bool)
    if float64_distance is not None:
        neg_lt = (le - eq)[m_row, i] - (same_le - same_eq)  # kept wrong identities strictly closer
        for r in np.unique(m_row[eq[m_row, i] > same_eq]):  # a wrong identity at a match's distance
            sel = m_row == r
            rank[sel], tie[r] = _break_ties(block[r], int(queries[r]), proto, m_val[sel], neg_lt[sel],
                                            float64_distance)
            broken[r] = True
    ap = np.bincount(m_row, weights=(i + 1.0) / (rank + 1.0), minlength=len(queries)) / n
    return _Rows(first=rank[i == 0], ap=ap, inp=n / (rank[i == n[m_row] - 1] + 1.0), float64=broken, tie=tie)


def _break_ties(row: np.ndarray, query: int, proto: _Protocol, p32: np.ndarray, neg_lt: np.ndarray,
                float64_distance: Float64Distance) -> tuple[np.ndarray, bool]:
    """Sorted kept ranks of one query's true matches when some tie a wrong identity in ``row``:
    items are ordered by (float32 distance, float64 distance), a wrong identity first where both
    are equal. Only the tied items' float64 distances are computed. ``p32``: the match distances,
    sorted; ``neg_lt``: per match, the kept wrong identities strictly closer in float32."""
    same = proto.items(np.array([query]))[1]
    match = same[proto.g_camids[same] != proto.q_camids[query]]
    match = match[np.argsort(row[match], kind="stable")]
    neg = np.setdiff1d(np.flatnonzero(np.isin(row, p32)), same)  # wrong identities at a match's distance
    d64 = float64_distance(query, np.concatenate([match, neg]))
    m64, n64, n32 = d64[:len(match)], d64[len(match):], row[neg]
    same32 = n32[None, :] == p32[:, None]
    before = np.count_nonzero(same32 & (n64[None, :] <= m64[:, None]), axis=1)
    exact = bool(np.any(same32 & (n64[None, :] == m64[:, None])))
    position = np.empty(len(match), np.int64)
    position[np.lexsort((m64, p32))] = np.arange(len(match))
    return np.sort(position + neg_lt + before), exact


class _Accumulator:
    """Sums the per-row results of the valid queries."""

    def __init__(self, max_rank: int):
        self.max_rank = max_rank
        self.first_hist = np.zeros(max_rank + 1, dtype=np.int64)  # last bin: first match beyond max_rank
        self.ap_sum = 0.0
        self.inp_sum = 0.0
        self.num_valid = 0
        self.float64_rows = 0
        self.tie_rows = 0

    def add(self, rows: _Rows) -> None:
        self.first_hist += np.bincount(np.minimum(rows.first, self.max_rank), minlength=self.max_rank + 1)
        self.ap_sum += float(rows.ap.sum())
        self.inp_sum += float(rows.inp.sum())
        self.num_valid += len(rows.first)
        self.float64_rows += int(rows.float64.sum())
        self.tie_rows += int(rows.tie.sum())

    def result(self, num_q: int, num_g: int, where: str, extra: dict | None = None) -> RankResult:
        if self.num_valid == 0:
            raise ValueError(f"no valid query: none of the {num_q} queries has a true match in the gallery "
                             f"({where}); check that query and gallery share identities on other cameras")
        cmc = np.cumsum(self.first_hist[:self.max_rank]).astype(np.float64) / self.num_valid
        return RankResult(cmc=cmc.astype(np.float32), mAP=self.ap_sum / self.num_valid,
                          mINP=self.inp_sum / self.num_valid, num_valid=self.num_valid,
                          num_query=num_q, num_gallery=num_g, extra=extra or {})


def _block_rows(num_g: int) -> int:
    return max(1, BLOCK_BYTES // (4 * num_g))


def _map_blocks(fn: Callable, items: Iterable) -> Iterator:
    """``map(fn, items)`` in order, on ``torch.get_num_threads()`` threads (numpy's comparisons
    release the GIL); the results, and so the sums, come back in the same order on any count."""
    items = list(items)
    workers = max(1, min(len(items), torch.get_num_threads()))
    if workers == 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        yield from pool.map(fn, items)


def _as_float(block: np.ndarray) -> np.ndarray:
    return block if block.dtype in (np.float32, np.float64) else block.astype(np.float64)


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50, *,
                  chunk: int | None = None) -> RankResult:
    """CMC / mAP / mINP from a query x gallery distance matrix (numpy or tensor, any real dtype).

    Equals torchreid's ``evaluate_rank(..., use_cython=False)`` on tie-free inputs; ties as in the
    module docstring. ``chunk`` caps the query rows ranked at once. Raises ``ValueError`` on
    mismatched shapes, NaN/inf, an empty set, or when no query has a true match."""
    if isinstance(distmat, torch.Tensor):
        distmat = distmat.detach().cpu().numpy()
    distmat = np.asarray(distmat)
    if distmat.ndim != 2:
        raise ValueError(f"distmat: expected a 2-D query x gallery array, got shape {distmat.shape}")
    if distmat.dtype.kind not in "fiu":
        raise ValueError(f"distmat: expected a numeric array, got dtype {distmat.dtype}")
    num_q, num_g = distmat.shape
    ids = _check_ids(num_q, num_g, q_pids, g_pids, q_camids, g_camids, max_rank)
    proto = _Protocol(*ids)
    check_finite(distmat[np.flatnonzero(proto.n_match == 0)], "distmat rows of queries without a match")
    acc = _Accumulator(int(max_rank))
    step = min(_block_rows(num_g), _chunk_size(chunk, num_g))

    def rank(start: int) -> _Rows:
        queries = proto.order[start:start + step]
        block = _as_float(distmat[queries])
        check_finite(block, f"distmat rows {queries.min()}-{queries.max()}")
        return _rank_block(block, queries, proto)

    for rows in _map_blocks(rank, range(0, len(proto.order), step)):
        acc.add(rows)
    return acc.result(num_q, num_g, "evaluate_rank")


def evaluate_features(query_feats, gallery_feats, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50,
                      metric: str = "cosine", chunk: int | None = None) -> RankResult:
    """CMC / mAP / mINP straight from features: distances of one query chunk at a time (torch,
    float32), ranked and accumulated; the full query x gallery matrix is never built. Where a true
    match ties a wrong identity in float32, the tie is broken by the float64 distances of the tied
    items (``extra["float64_rows"]`` counts those queries; ``extra["tie_rows"]``, the ones with an
    exact float64 tie left, ranked as the module docstring says).

    ``metric``: ``"cosine"`` (``1 - cos``, the protocol's) or ``"euclidean"`` (squared)."""
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    qt, gt = as_tensor(query_feats, "query features"), as_tensor(gallery_feats, "gallery features")
    num_q, num_g = qt.shape[0], gt.shape[0]
    ids = _check_ids(num_q, num_g, q_pids, g_pids, q_camids, g_camids, max_rank)
    proto = _Protocol(*ids)
    acc = _Accumulator(int(max_rank))
    float64_distance = _float64_distance(query_feats, gallery_feats, metric)
    block_rows = _block_rows(num_g)
    ranked = qt[torch.from_numpy(proto.order)]  # most matches first, as the blocks want
    for start, chunk_dist in iter_distance_chunks(ranked, gt, metric, _chunk_size(chunk, num_g)):
        chunk_dist = chunk_dist.numpy()

        def rank(sub: int, dist=chunk_dist, start=start) -> _Rows:
            queries = proto.order[start + sub:start + min(sub + block_rows, len(dist))]
            return _rank_block(dist[sub:sub + block_rows], queries, proto, float64_distance)

        for rows in _map_blocks(rank, range(0, len(chunk_dist), block_rows)):
            acc.add(rows)
    if acc.float64_rows:
        log.info("evaluate_features: float32 ties with a wrong identity in %d of %d queries, broken in "
                 "float64 (%d with an exact tie left)", acc.float64_rows, acc.num_valid, acc.tie_rows)
    return acc.result(num_q, num_g, "evaluate_features",
                      {"float64_rows": acc.float64_rows, "tie_rows": acc.tie_rows})


def _float64_distance(query_feats, gallery_feats, metric: str) -> Float64Distance:
    """``distance(query, gallery_indices)``: the ``metric`` distance in float64 from the features
    as given (only for the few items of a tie, so the gallery is never converted whole)."""
    def rows(feats, index) -> np.ndarray:
        if isinstance(feats, torch.Tensor):
            return feats[torch.as_tensor(index)].detach().cpu().double().numpy()
        return np.asarray(np.asarray(feats)[index], dtype=np.float64)

    def distance(query: int, gallery: np.ndarray) -> np.ndarray:
        q, g = rows(query_feats, [query])[0], rows(gallery_feats, gallery)
        if metric == "euclidean":
            return ((g - q) ** 2).sum(1)
        q_norm = max(float(np.linalg.norm(q)), 1e-12)  # as torch's normalize: each norm at least eps
        return 1.0 - (g @ q) / (np.maximum(np.linalg.norm(g, axis=1), 1e-12) * q_norm)

    return distance
