"""Ranking speed and peak memory: ``evaluate_rank`` vs a plain argsort vs torchreid's Python path.

    .venv/bin/python benchmarks/eval_speed.py [--skip-slow-baselines] [--ref-queries 300] [--skip-msmt]

Cases (each in its own interpreter, so peak RSS is per case; the matrix is built before the clock):
- market_features_*: Market-1501 size, 3368 x 15913, float32 cosine distances of identity-clustered
  768-d features (true matches mostly near the top of the list);
- market_random_*: the same ids with a uniformly random float32 matrix (true matches anywhere in the
  list; float32 values on a 2^-24 grid, so a few exact ties);
- *_argsort: the plain baseline, one full stable argsort of the matrix and a loop over queries;
- market_features_torchreid: torchreid's Python path on the first ``--ref-queries`` queries,
  extrapolated linearly (``--ref-queries 0``: all, ~1-2 min); ``--skip-slow-baselines`` drops it;
- msmt_ours: MSMT17 size, 11659 x 82161, from 768-d features (``evaluate_features``: distances
  per query chunk + ranking; the time includes the distance products). No argsort baseline at
  that size (it would hold 11659 x 82161 int64 indices: 7.7 GB).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_common import peak_rss_gib, run_case, synthetic, table  # noqa: E402

MARKET = dict(nq=3368, ng=15913, dim=768, n_ids=750, n_cams=6)
MSMT = dict(nq=11659, ng=82161, dim=768, n_ids=3060, n_cams=15)


def argsort_rank(distmat: np.ndarray, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50):
    """The plain baseline: stable argsort of every row, then each query's match positions.
    Returns (rank-1, mAP) as fractions; ties by gallery index."""
    order = np.argsort(distmat, axis=1, kind="stable")
    same_pid = g_pids[order] == q_pids[:, None]
    same_cam = g_camids[order] == q_camids[:, None]
    keep, match = ~(same_pid & same_cam), same_pid & ~same_cam
    first, aps = [], []
    for i in range(len(distmat)):
        pos = np.flatnonzero(match[i][keep[i]])
        if len(pos):
            first.append(pos[0])
            aps.append(np.mean(np.arange(1, len(pos) + 1) / (pos + 1.0)))
    return float(np.mean(np.asarray(first) == 0)), float(np.mean(aps))


def _market(kind: str):
    from dmf_core.eval.distances import cosine_distance

    qf, gf, *ids = synthetic(**MARKET)
    if kind == "random":
        return np.random.default_rng(1).random((MARKET["nq"], MARKET["ng"]), dtype=np.float32), ids
    return cosine_distance(qf, gf), ids


def _row(name: str, wall: float, rank1: float, mAP: float, note: str = "") -> dict:
    return {"case": name, "wall_s": round(wall, 3), "peak_rss_gib": round(peak_rss_gib(), 2),
            "rank1": round(100 * rank1, 2), "mAP": round(100 * mAP, 3), "note": note}


def case(name: str, ref_queries: int) -> dict:
    from dmf_core.eval.ranking import evaluate_features, evaluate_rank

    if name == "msmt_ours":
        qf, gf, q_pids, g_pids, q_cams, g_cams = synthetic(**MSMT)
        t = time.perf_counter()
        r = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, 50)
        return _row(name, time.perf_counter() - t, float(r.cmc[0]), r.mAP, "features 768-d, distances included")
    _, kind, method = name.split("_")
    dist, (q_pids, g_pids, q_cams, g_cams) = _market(kind)
    t = time.perf_counter()
    if method == "ours":
        r = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, 50)
        return _row(name, time.perf_counter() - t, float(r.cmc[0]), r.mAP)
    if method == "argsort":
        rank1, mAP = argsort_rank(dist, q_pids, g_pids, q_cams, g_cams, 50)
        return _row(name, time.perf_counter() - t, rank1, mAP)
    from tests._torchreid_ref import rank_module

    ref = rank_module()
    n = len(dist) if ref_queries <= 0 else min(ref_queries, len(dist))
    cmc, mAP = ref.evaluate_rank(dist[:n], q_pids[:n], g_pids, q_cams[:n], g_cams, 50, use_cython=False)
    wall = (time.perf_counter() - t) * len(dist) / n
    return _row(name, wall, float(cmc[0]), float(mAP),
                f"{n} of {len(dist)} queries, extrapolated" if n < len(dist) else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case")
    ap.add_argument("--skip-slow-baselines", action="store_true")
    ap.add_argument("--ref-queries", type=int, default=300)
    ap.add_argument("--skip-msmt", action="store_true")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(case(args.case, args.ref_queries)), flush=True)
        return
    cases = ["market_features_ours", "market_features_argsort", "market_random_ours", "market_random_argsort"]
    if not args.skip_slow_baselines:
        cases.append("market_features_torchreid")
    if not args.skip_msmt:
        cases.append("msmt_ours")
    rows = []
    for c in cases:
        rows.append(run_case(__file__, c, ["--ref-queries", str(args.ref_queries)]))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows, ["case", "wall_s", "peak_rss_gib", "rank1", "mAP", "note", "error"]))


if __name__ == "__main__":
    main()
