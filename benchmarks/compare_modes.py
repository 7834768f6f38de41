"""Does multimodal pretraining help? `fusion.mode` shared vs image_only over several seeds.

For every (seed, mode) it runs `dvc exp run -S seed=<s> -S fusion.mode=<m> [extra -S ...]` in
the current DVC project (only pretrain and what follows re-run: the data stages are cached),
reads the whole matrix `reports/eval_matrix.json` and records the mean cross-domain mAP/rank-1
of the fine-tuned models (every source x target cell) and of each cell. Prints a Markdown table
with mean +- std per mode and writes everything as JSON.

    python benchmarks/compare_modes.py --seeds 0 1 2 --json docs/results/compare_modes.json
    python benchmarks/compare_modes.py --seeds 0 --set fusion.align_weight=0.5

Run it in a clone (the workspace ends holding the last experiment); ~5 min per run on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path


def run_experiment(seed: int, mode: str, extra: list[str]) -> dict:
    sets = [f"seed={seed}", f"fusion.mode={mode}", *extra]
    cmd = ["dvc", "exp", "run", *(arg for s in sets for arg in ("-S", s))]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    matrix = json.loads(Path("reports/eval_matrix.json").read_text())  # with the untrained reference
    cells = {f"{s}->{t}": {k: matrix["cells"][s][t][k] for k in ("mAP", "rank1")}
             for s in matrix["sources"] for t in matrix["targets"]}
    untrained = [matrix["cells"][s][t]["untrained"]["mAP"] for s in matrix["sources"] for t in matrix["targets"]]
    return {"seed": seed, "mode": mode, "set": sets, "wall_s": round(wall, 1),
            "mean_mAP": statistics.fmean(c["mAP"] for c in cells.values()),
            "mean_rank1": statistics.fmean(c["rank1"] for c in cells.values()),
            "untrained_mean_mAP": statistics.fmean(untrained), "cells": cells}


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summary(runs: list[dict]) -> str:
    lines = ["| mode | seeds | mean mAP (%) | mean rank-1 (%) | per seed mAP |", "|---|---|---|---|---|"]
    for mode in dict.fromkeys(r["mode"] for r in runs):
        rs = [r for r in runs if r["mode"] == mode]
        maps, r1s = [r["mean_mAP"] for r in rs], [r["mean_rank1"] for r in rs]
        lines.append(f"| {mode} | {len(rs)} | {statistics.fmean(maps):.2f} +- {_sd(maps):.2f} | "
                     f"{statistics.fmean(r1s):.2f} +- {_sd(r1s):.2f} | "
                     f"{', '.join(f'{m:.2f}' for m in maps)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--modes", nargs="+", default=["shared", "image_only"])
    ap.add_argument("--set", action="append", default=[], help="extra -S override for every run")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    runs = []
    for seed in args.seeds:
        for mode in args.modes:
            runs.append(run_experiment(seed, mode, args.set))
            r = runs[-1]
            print(f"seed {seed} {mode}: mean mAP {r['mean_mAP']:.2f} rank-1 {r['mean_rank1']:.2f} "
                  f"(untrained {r['untrained_mean_mAP']:.2f}) in {r['wall_s']:.0f} s", flush=True)
            if args.json:  # after every run: a long sweep loses nothing when stopped
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({
                    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                    "command": "python benchmarks/compare_modes.py " + " ".join(
                        [f"--seeds {' '.join(map(str, args.seeds))}", *(f"--set {s}" for s in args.set)]),
                    "runs": runs}, indent=2) + "\n")
    print(summary(runs))


if __name__ == "__main__":
    main()
