"""k-reciprocal re-ranking speed and peak memory: ours (dense, sparse) vs torchreid's re_ranking.

    .venv/bin/python benchmarks/rerank_speed.py [--skip-slow-baselines] [--msmt]

Cases (each in its own interpreter, so peak RSS is per case):
- small_*: 1,500 items (150 x 1350, 768-d): torchreid re_ranking, our dense path, our sparse path;
- market_sparse: Market-1501 size (3368 x 15913) from 768-d features, k1=20, k2=6, lambda=0.3;
- market_dense: our dense path at Market size (needs ~8 GiB: run only with --market-dense);
- msmt_estimate: the up-front memory estimate at MSMT17 size (11659 x 82161) and whether it would run
  here; ``--msmt`` actually runs it (minutes on 2 cores).
torchreid's re_ranking at Market size (dense (q+g)^2 float32 x several copies, a Python loop over
19,281 items) is not run; ``--skip-slow-baselines`` drops even the 1,500-item reference.
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

SIZES = {"small": dict(nq=150, ng=1350, dim=768, n_ids=100, n_cams=6),
         "market": dict(nq=3368, ng=15913, dim=768, n_ids=750, n_cams=6),
         "msmt": dict(nq=11659, ng=82161, dim=768, n_ids=3060, n_cams=15)}


def case(name: str) -> dict:
    from dmf_core.eval.distances import cosine_distance
    from dmf_core.eval.ranking import evaluate_rank
    from dmf_core.eval.rerank import (
        available_memory_bytes,
        estimate_sparse_bytes,
        k_reciprocal_rerank,
        rerank_from_features,
    )

    size, kind = name.split("_", 1)
    spec = SIZES[size]
    if kind == "estimate":
        need = estimate_sparse_bytes(spec["nq"], spec["ng"])
        return {"case": name, "note": f"needs ~{need / 2**30:.1f} GiB, available "
                f"{available_memory_bytes() / 2**30:.1f} GiB: "
                f"{'runs' if need < available_memory_bytes() else 'refused up front'}"}
    qf, gf, q_pids, g_pids, q_cams, g_cams = synthetic(**spec)
    t = time.perf_counter()
    if kind == "sparse":
        dist = rerank_from_features(qf, gf)
    else:
        qg, qq, gg = cosine_distance(qf, gf), cosine_distance(qf, qf), cosine_distance(gf, gf)
        if kind == "dense":
            dist = k_reciprocal_rerank(qg, qq, gg)
        else:
            from tests._torchreid_ref import rerank_module

            dist = rerank_module().re_ranking(qg, qq, gg)
    wall = time.perf_counter() - t
    r = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams)
    return {"case": name, "wall_s": round(wall, 2), "peak_rss_gib": round(peak_rss_gib(), 2),
            "rank1": round(100 * float(r.cmc[0]), 2), "mAP": round(100 * r.mAP, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case")
    ap.add_argument("--skip-slow-baselines", action="store_true")
    ap.add_argument("--market-dense", action="store_true")
    ap.add_argument("--msmt", action="store_true")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(case(args.case)), flush=True)
        return
    cases = ([] if args.skip_slow_baselines else ["small_torchreid"]) + ["small_dense", "small_sparse",
                                                                         "market_sparse"]
    if args.market_dense:
        cases.append("market_dense")
    cases.append("msmt_sparse" if args.msmt else "msmt_estimate")
    rows = []
    for c in cases:
        rows.append(run_case(__file__, c, [], timeout=3600))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows, ["case", "wall_s", "peak_rss_gib", "rank1", "mAP", "note", "error"]))


if __name__ == "__main__":
    main()
