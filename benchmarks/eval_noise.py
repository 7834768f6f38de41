"""How much of a paired difference's spread is the evaluation's? A bootstrap over test identities.

The `pretrain` row is the mean mAP over the targets' query sets, each a sample of identities
(64 a target in the demo). Resampling a target's query identities with replacement (the gallery
stays whole) gives the standard error that sample alone puts on the row, for one model and for
the difference of two models scored on the same resample (a paired bootstrap). Set beside the SD
of paired differences across training seeds, it says how much of the uncertainty is the test
identities': the part each seed's difference carries of its own, and the part every seed shares
(the same identities score every seed), which more seeds never average away.

    python benchmarks/eval_noise.py --data data/raw --targets sp_market sp_cuhk sp_msmt \\
        --pair models_a/pretrain models_b/pretrain [--pair ...]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch

from dmf_core.data.sources.layouts import MARKET_RE
from dmf_core.eval.distances import cosine_distance
from dmf_core.eval.ranking import evaluate_rank
from dmf_core.extractor import FeatureExtractor


def market_split(folder: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Sorted image paths of a Market-layout folder with their pids and cameras; junk (pid -1) left
    out, as the Market protocol (and the pipeline's manifests) do."""
    paths, pids, cams = [], [], []
    for path in sorted(folder.glob("*.jpg")):
        match = MARKET_RE.match(path.name)
        if match is None:
            raise SystemExit(f"{path}: not a Market-style name (<pid>_c<cam>...)")
        if int(match.group(1)) == -1:
            continue
        paths.append(str(path))
        pids.append(int(match.group(1)))
        cams.append(int(match.group(2)))
    return paths, np.asarray(pids), np.asarray(cams)


def distances(model: Path, query: list[str], gallery: list[str]) -> np.ndarray:
    extractor = FeatureExtractor.from_pretrained(model, flip=False)
    return np.asarray(cosine_distance(extractor(query, progress=False), extractor(gallery, progress=False)))


def resampled_maps(dist: np.ndarray, q: tuple, g: tuple, draws: list[np.ndarray]) -> np.ndarray:
    """mAP (percent) on the full query set, then on each draw (query identities, with replacement)."""
    q_pids, q_cams = q
    rows = [np.arange(len(q_pids))] + [np.concatenate([np.flatnonzero(q_pids == pid) for pid in d]) for d in draws]
    return np.array([100.0 * evaluate_rank(dist[r], q_pids[r], g[0], q_cams[r], g[1], max_rank=1).mAP
                     for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder holding <target>/query and bounding_box_test")
    ap.add_argument("--targets", nargs="+", required=True)
    ap.add_argument("--pair", type=Path, nargs=2, action="append", required=True, metavar=("A", "B"),
                    help="two model folders trained from one seed (B - A is the paired difference)")
    ap.add_argument("--draws", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    splits = {t: (market_split(args.data / t / "query"), market_split(args.data / t / "bounding_box_test"))
              for t in args.targets}
    draws = {t: [rng.choice(np.unique(q[1]), size=len(np.unique(q[1]))) for _ in range(args.draws)]
             for t, (q, _g) in splits.items()}
    print("| A | B | row A | row B | B - A | SE of row A | SE of B - A |\n|---|---|---:|---:|---:|---:|---:|")
    ses, diffs = [], []
    for a, b in args.pair:
        rows = {}
        for model in (a, b):
            per_target = [resampled_maps(distances(model, q[0], g[0]), q[1:], g[1:], draws[t])
                          for t, (q, g) in splits.items()]
            rows[model] = np.mean(per_target, axis=0)  # the row: the mean over targets, per draw
        diff = rows[b] - rows[a]
        diffs.append(diff)
        ses.append(float(rows[a][1:].std(ddof=1)))
        print(f"| {a} | {b} | {rows[a][0]:.2f} | {rows[b][0]:.2f} | {diff[0]:+.2f} | {ses[-1]:.2f} | "
              f"{diff[1:].std(ddof=1):.2f} |")
    # Every seed is scored on the same identities: what they add to the mean over seeds is the
    # spread, over draws, of the mean difference (the draws are shared by all pairs).
    mean_diff = np.mean(diffs, axis=0)
    print(f"\nmean SE of row A {statistics.fmean(ses):.2f} mAP; mean SE of one pair's B - A "
          f"{statistics.fmean(float(d[1:].std(ddof=1)) for d in diffs):.2f} mAP; SE of the mean B - A over "
          f"the {len(diffs)} pairs {mean_diff[1:].std(ddof=1):.2f} mAP ({args.draws} draws of the query identities)")


if __name__ == "__main__":
    main()
