"""Ranking speed and peak memory: ours vs torchreid's Python path vs a plain vectorised argsort.

    .venv/bin/python benchmarks/eval_speed.py [--skip-slow-baselines] [--ref-queries 300] [--skip-msmt]

Cases (each in its own interpreter, so peak RSS is per case):
- market_*: Market-1501 size, 3368 x 15913, from a given float32 distance matrix (cosine distances
  of identity-clustered 768-d features; the matrix is built before the clock starts);
- msmt_ours: MSMT17 size, 11659 x 82161, from 768-d features (evaluate_features: distances per
  query chunk + ranking; the time includes the distance products).
torchreid's Python path (~2 min at Market size) runs on the first ``--ref-queries`` queries and is
extrapolated linearly, unless ``--ref-queries 0`` (all); ``--skip-slow-baselines`` drops it.
The plain argsort baseline is not run at MSMT size (it holds 11659 x 82161 int64 indices: 7.7 GB).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_common import peak_rss_gib, run_case, synthetic, table  # noqa: E402

MARKET = dict(nq=3368, ng=15913, dim=768, n_ids=750, n_cams=6)
MSMT = dict(nq=11659, ng=82161, dim=768, n_ids=3060, n_cams=15)


def _market_dist():
    from dmf_core.eval.distances import cosine_distance

    qf, gf, *ids = synthetic(**MARKET)
    return cosine_distance(qf, gf), ids


def case(name: str, ref_queries: int) -> dict:
    import numpy as np

    from dmf_core.eval.ranking import evaluate_features, evaluate_rank, evaluate_rank_argsort

    if name.startswith("market"):
        dist, (q_pids, g_pids, q_cams, g_cams) = _market_dist()
        t = time.perf_counter()
        note = ""
        if name == "market_ours":
            r = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, 50)
        elif name == "market_argsort":
            r = evaluate_rank_argsort(dist, q_pids, g_pids, q_cams, g_cams, 50)
        else:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tests._torchreid_ref import rank_module

            ref = rank_module()
            n = len(dist) if ref_queries <= 0 else min(ref_queries, len(dist))
            cmc, mAP = ref.evaluate_rank(dist[:n], q_pids[:n], g_pids, q_cams[:n], g_cams, 50, use_cython=False)
            wall = (time.perf_counter() - t) * len(dist) / n
            return {"case": name, "wall_s": round(wall, 1), "peak_rss_gib": round(peak_rss_gib(), 2),
                    "rank1": round(100 * float(cmc[0]), 2), "mAP": round(100 * float(mAP), 2),
                    "note": f"{n} of {len(dist)} queries, extrapolated" if n < len(dist) else ""}
        wall = time.perf_counter() - t
    else:
        qf, gf, q_pids, g_pids, q_cams, g_cams = synthetic(**MSMT)
        t = time.perf_counter()
        r = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, 50)
        wall = time.perf_counter() - t
        note = "features 768-d, distances included"
        del np
    return {"case": name, "wall_s": round(wall, 2), "peak_rss_gib": round(peak_rss_gib(), 2),
            "rank1": round(100 * float(r.cmc[0]), 2), "mAP": round(100 * r.mAP, 2), "note": note}


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
    cases = ["market_ours", "market_argsort"]
    if not args.skip_slow_baselines:
        cases.append("market_torchreid")
    if not args.skip_msmt:
        cases.append("msmt_ours")
    rows = []
    for c in cases:
        rows.append(run_case(__file__, c, ["--ref-queries", str(args.ref_queries)]))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows, ["case", "wall_s", "peak_rss_gib", "rank1", "mAP", "note", "error"]))


if __name__ == "__main__":
    main()
