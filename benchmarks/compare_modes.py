"""Does caption fusion make features transfer? The method against its baseline and two controls,
over paired seeds, with the same step budget (the same params but the arm's own).

Arms (each a set of `dvc exp run -S` overrides):

* ``image_only``  -- the baseline: images alone;
* ``shared``      -- the method: images and captions through one encoder;
* ``attributes``  -- control: the 13 attributes the captions state, as a classification head on
  the images, no language (is it language, or just attribute supervision?);
* ``shuffled``    -- control: the method, but each identity reads another identity's captions
  (does caption content matter?);
* ``shared_person`` -- the method with captions of the person only (attributes and viewpoint, no
  weather, time of day or scene): which content should teach?
* ``shared_head`` -- the method with the image<->caption term on a projection head per modality
  (``fusion.align_on: head``), so the retrieval feature is not the aligned feature;
* ``prototypes`` -- language as a teacher: a second identity classifier whose class weights are
  projections of each identity's mean caption embedding (``fusion.mode: prototypes``);
* ``phrases`` -- language as the attribute teacher: attribute-value logits as cosines with the
  projected embeddings of the value phrases (``fusion.mode: phrases``);
* ``prototypes_learned`` / ``phrases_learned`` -- their no-language twins: the same heads with
  learned vectors in place of the text embeddings (``fusion.teacher: learned``);
* ``prototypes_attributes`` -- the text prototypes and the attribute head together
  (``fusion.attribute_head: true``): does language add to attribute supervision?
* ``prototypes_shuffled`` -- control: the text prototypes, each given to another identity (the
  same vectors and geometry, untrue of the identity).

For every (world, arm, seed) it runs `dvc exp run -S seed=<s> -S synth.seed=<world> ...` in the
current DVC project (the data stages re-run for a new world, and the captions stage when an arm
changes `captions.*`), and records from
``reports/eval_matrix.json`` and ``metrics/pretrain.json``: the cross-domain mean mAP / rank-1 of
the ``pretrain`` row and of the fine-tuned rows, caption->image retrieval mAP on held-out
identities, and the feature health. The JSON is rewritten after every run, and runs already in
it are skipped, so a sweep can span sessions. The summary gives per arm the mean +- sd and the
paired difference to ``image_only`` (same world, settings and seed, run on the same CPU: pairs
across CPUs are left out and counted) with its 95 % t interval, the SD of the paired
differences, the difference they detect at 80 % power and the seeds a 2.5-point one needs.
Worlds 0 and 1 are dev worlds (designs are chosen there), 2 and 3 test worlds (only confirmed).

    python benchmarks/compare_modes.py --json docs/results/compare_arms_world0.json
    python benchmarks/compare_modes.py --world 1 --json docs/results/compare_arms_world1.json
    python benchmarks/compare_modes.py --summary docs/results/compare_arms_world0.json
    python benchmarks/compare_modes.py --compare fp32.json bf16.json   # a --set sweep against another

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

ARMS: dict[str, list[str]] = {
    "image_only": ["fusion.mode=image_only"],
    "shared": ["fusion.mode=shared"],
    "attributes": ["fusion.mode=attributes"],
    "shuffled": ["fusion.mode=shared", "fusion.captions=shuffled"],
    "shared_person": ["fusion.mode=shared", "captions.content=person"],
    "shared_head": ["fusion.mode=shared", "fusion.align_on=head"],
    "prototypes": ["fusion.mode=prototypes"],
    "prototypes_learned": ["fusion.mode=prototypes", "fusion.teacher=learned"],
    "prototypes_attributes": ["fusion.mode=prototypes", "fusion.attribute_head=true"],
    "prototypes_shuffled": ["fusion.mode=prototypes", "fusion.captions=shuffled"],
    "phrases": ["fusion.mode=phrases"],
    "phrases_learned": ["fusion.mode=phrases", "fusion.teacher=learned"],
}
BASELINE = "image_only"
# Designs and knobs are chosen on the dev worlds; the test worlds confirm, and nothing is chosen on them.
DEV_WORLDS, TEST_WORLDS = (0, 1), (2, 3)
# Quantiles of Student's t by degrees of freedom: two-sided 95 % (the interval) and one-sided 80 % (power)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}
T80 = {1: 1.376, 2: 1.061, 3: 0.978, 4: 0.941, 5: 0.920, 6: 0.906, 7: 0.896, 8: 0.889, 9: 0.883,
       10: 0.879, 15: 0.866, 20: 0.860, 30: 0.854, 60: 0.848, 120: 0.845}
TARGET_EFFECT = 2.5  # mAP points a sweep should be able to detect on the pretrain row


def _quantile(table: dict[int, float], df: int) -> float:
    return table.get(df) or table[max(k for k in table if k <= df)]


def t975(df: int) -> float:
    return _quantile(T975, df)


def world_role(world: int) -> str:
    return "dev" if world in DEV_WORLDS else "test" if world in TEST_WORLDS else "other"


def _mean_of_rows(matrix: dict, rows: list[str], key: str) -> float:
    return statistics.fmean(matrix["cross_domain"][r][key] for r in rows)


def cpu_name() -> str:
    """The CPU model and its vector extensions: float results, hence runs, differ between CPUs."""
    info = Path("/proc/cpuinfo")
    text = info.read_text() if info.exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model} ({' '.join(isa) or 'no avx2'}), {os.cpu_count()} cores"


def read_run(world: int, arm: str, seed: int, sets: list[str], wall_s: float, rows: str = "all") -> dict:
    """What one finished experiment left in the workspace (``rows="pretrain"``: the pretrain
    row's cells only, the fine-tuned rows were not run)."""
    pretrain = json.loads(Path("metrics/pretrain.json").read_text())
    record = {"world": world, "role": world_role(world), "arm": arm, "seed": seed, "set": sets, "rows": rows,
              "wall_s": round(wall_s, 1), "cpu": cpu_name(),
              "caption_to_image_mAP": pretrain.get("health", {}).get("caption_to_image_mAP")}
    if rows == "pretrain":
        cells = {t: json.loads(Path(f"reports/eval/pretrain__{t}.json").read_text()) for t in eval_targets()}
        return {**record, "pretrain_mAP": round(statistics.fmean(c["mAP"] for c in cells.values()), 2),
                "pretrain_rank1": round(statistics.fmean(c["rank1"] for c in cells.values()), 2),
                "finetuned_mAP": None, "finetuned_rank1": None,
                "health": {"pretrain": pretrain.get("health", {})},
                "cells": {t: {"mAP": c["mAP"], "rank1": c["rank1"]} for t, c in cells.items()}}
    matrix = json.loads(Path("reports/eval_matrix.json").read_text())
    finetuned = [r for r in matrix["sources"] if r != "pretrain"]
    return {
        **record,
        "pretrain_mAP": matrix["cross_domain"]["pretrain"]["mAP"],
        "pretrain_rank1": matrix["cross_domain"]["pretrain"]["rank1"],
        "finetuned_mAP": _mean_of_rows(matrix, finetuned, "mAP"),
        "finetuned_rank1": _mean_of_rows(matrix, finetuned, "rank1"),
        "health": {"pretrain": pretrain.get("health", {}),
                   **{r: json.loads(Path(f"metrics/finetune/{r}.json").read_text()).get("health", {})
                      for r in finetuned}},
        "cross_domain": matrix["cross_domain"],
    }


def eval_targets() -> list[str]:
    import yaml

    return list(yaml.safe_load(Path("params.yaml").read_text())["evaluate"]["targets"])


def run_experiment(world: int, arm: str, seed: int, extra: list[str], rows: str = "all") -> dict:
    sets = [f"seed={seed}", f"synth.seed={world}", *ARMS[arm], *extra]
    cmd = ["dvc", "exp", "run", *(arg for s in sets for arg in ("-S", s))]
    # `-S` edits the workspace's params.yaml, which still holds the previous experiment's values:
    # without this an arm would inherit the knobs of the arm before it (fusion.captions=shuffled
    # into the attribute control, captions.content=person into the next world)
    subprocess.run(["git", "checkout", "HEAD", "--", "params.yaml"], check=True)
    if rows == "pretrain":  # only what the pretrain row's cells need: no fine-tuning
        cmd += [f"evaluate@pretrain-{t}" for t in eval_targets()]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return read_run(world, arm, seed, sets, time.perf_counter() - t0, rows)


def settings(run: dict) -> tuple[str, ...]:
    """The run's ``-S`` overrides other than its seed, its world and its arm's own: runs pair only
    when these are equal."""
    own = set(ARMS[run["arm"]])
    sets = sorted(s for s in run["set"] if s not in own and not s.startswith(("seed=", "synth.seed=")))
    return (*sets, f"rows={run.get('rows', 'all')}")


def check_unique(runs: list[dict]) -> None:
    """One run per (world, arm, settings, seed, CPU): a second would be silently averaged in."""
    keys = [(r["world"], r["arm"], settings(r), r["seed"], r.get("cpu")) for r in runs]
    twice = sorted({k for k in keys if keys.count(k) > 1}, key=str)
    if twice:
        raise SystemExit(f"more than one run of (world, arm, settings, seed, cpu): {twice}")


def paired(runs: list[dict], arm: str, key: str, baseline: str = BASELINE) -> tuple[list[float], int]:
    """arm - baseline per (world, settings, seed) run on the same CPU, and how many of the arm's
    runs had their baseline only on another CPU (float results, hence trajectories, differ
    between CPUs: such a pair is two seeds, not one, and stays out of the intervals)."""
    check_unique(runs)
    base = {(r["world"], settings(r), r["seed"], r.get("cpu")): r[key] for r in runs
            if r["arm"] == baseline and r[key] is not None}
    anywhere = {k[:3] for k in base}
    diffs, cross = [], 0
    for r in runs:
        if r["arm"] != arm or r[key] is None:
            continue
        k = (r["world"], settings(r), r["seed"])
        if (*k, r.get("cpu")) in base:
            diffs.append(r[key] - base[(*k, r.get("cpu"))])
        elif k in anywhere:
            cross += 1
    return diffs, cross


def interval(diffs: list[float]) -> str:
    if len(diffs) < 2:
        return f"{diffs[0]:+.2f} (1 pair)" if diffs else "-"
    m, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = t975(len(diffs) - 1) * sd / len(diffs) ** 0.5
    return f"{m:+.2f} [{m - half:+.2f}, {m + half:+.2f}]"


def detectable(sd: float, n: int) -> float:
    """The smallest true paired difference a two-sided 5 % paired t-test detects with 80 % power
    over ``n`` pairs whose differences have standard deviation ``sd``."""
    return (t975(n - 1) + _quantile(T80, n - 1)) * sd / n ** 0.5


def seeds_needed(sd: float, effect: float = TARGET_EFFECT, most: int = 200) -> int | None:
    """Paired seeds for ``effect`` to be detectable at 80 % power (None: more than ``most``)."""
    return next((n for n in range(2, most + 1) if detectable(sd, n) <= effect), None)


def power(diffs: list[float]) -> str:
    """SD of the paired differences, what they can detect, and the seeds a 2.5-point effect needs."""
    if len(diffs) < 2:
        return "- | - | -"
    sd = statistics.stdev(diffs)
    need = seeds_needed(sd)
    return f"{sd:.2f} | {detectable(sd, len(diffs)):.2f} | {need if need else '> 200'}"


def _ms(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} +- {sd:.2f}"


def summary(runs: list[dict], baseline: str = BASELINE) -> str:
    """Per (world, settings, arm): means +- SD, the paired difference to ``baseline`` with its
    95 % interval and, for the pretrain row, the SD of the paired differences, the difference
    those pairs detect at 80 % power and the seeds a 2.5-point difference needs."""
    check_unique(runs)
    lines = [f"| world | settings | arm | seeds | pretrain row mAP | fine-tuned mAP | pretrain mAP - {baseline} "
             f"[95 % CI] | paired SD | detectable (80 %) | seeds for 2.5 | fine-tuned mAP - {baseline} [95 % CI] | "
             "caption->image mAP |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    crossed = []
    for world, kept in sorted({(r["world"], settings(r)) for r in runs}):
        at = [r for r in runs if r["world"] == world and settings(r) == kept]
        for arm in [a for a in ARMS if any(r["arm"] == a for r in at)]:
            rs = [r for r in at if r["arm"] == arm]
            base = arm == baseline
            pre, n_cross = ([], 0) if base else paired(at, arm, "pretrain_mAP", baseline)
            fine = [] if base else paired(at, arm, "finetuned_mAP", baseline)[0]
            if n_cross:
                crossed.append(f"{arm} (world {world}): {n_cross}")
            lines.append(
                f"| {world} ({world_role(world)}) | {' '.join(kept)} | {arm} | {len(rs)} | "
                f"{_ms([r['pretrain_mAP'] for r in rs])} | "
                f"{_ms([r['finetuned_mAP'] for r in rs])} | {'-' if base else interval(pre)} | "
                f"{'- | - | -' if base else power(pre)} | {'-' if base else interval(fine)} | "
                f"{_ms([r['caption_to_image_mAP'] for r in rs])} |")
    if crossed:
        lines.append("\nLeft out of the intervals, their baseline ran on another CPU: " + ", ".join(crossed))
    return "\n".join(lines)


def compare_files(a: list[dict], b: list[dict], arms: tuple[str, str] | None = None) -> str:
    """Each (world, arm) that both sweeps ran: b minus a over the seeds both have (e.g. a setting
    given with --set, such as train.precision=bf16, against the sweep without it). With ``arms``
    (arm of a, arm of b): that arm of b minus that arm of a, across settings and arms alike."""
    if arms:
        label = f"{arms[1]} - {arms[0]}"
        a = [{**r, "arm": label} for r in a if r["arm"] == arms[0]]
        b = [{**r, "arm": label} for r in b if r["arm"] == arms[1]]
    lines = ["| world | arm | seeds | pretrain row mAP, a | pretrain row mAP, b | b - a [95 % CI] | "
             "fine-tuned mAP, a | fine-tuned mAP, b | b - a [95 % CI] | wall s, a | wall s, b |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for runs in (a, b):
        keys = [(r["world"], r["arm"], r["seed"]) for r in runs]
        if len(keys) != len(set(keys)):
            raise SystemExit("--compare needs one run per (world, arm, seed) in each file: "
                             f"{sorted({k for k in keys if keys.count(k) > 1})} more than once")
    first = {(r["world"], r["arm"], r["seed"]): r for r in a}
    for world, arm in sorted({(r["world"], r["arm"]) for r in b}):
        pairs = [(first[(world, arm, r["seed"])], r) for r in b
                 if r["world"] == world and r["arm"] == arm and (world, arm, r["seed"]) in first
                 and first[(world, arm, r["seed"])].get("cpu") == r.get("cpu")]  # one CPU per pair
        if not pairs:
            continue
        cols = [f"{world}", arm, str(len(pairs))]
        for key in ("pretrain_mAP", "finetuned_mAP"):
            cols += [_ms([x[key] for x, _ in pairs]), _ms([y[key] for _, y in pairs]),
                     interval([y[key] - x[key] for x, y in pairs if None not in (x[key], y[key])])]
        cols += [_ms([x["wall_s"] for x, _ in pairs]), _ms([y["wall_s"] for _, y in pairs])]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def _save(path: Path, runs: list[dict], command: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "machine": "per run, under cpu",
        "command": command, "runs": runs}, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="for image_only and shared")
    ap.add_argument("--control-seeds", type=int, nargs="+", default=[0, 1, 2], help="for the controls")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--world", type=int, default=0, help="synth.seed: which generated SynthPed world")
    ap.add_argument("--set", action="append", default=[], help="extra -S override for every run")
    ap.add_argument("--json", type=Path, default=None, help="results so far; runs in it are skipped")
    ap.add_argument("--rows", choices=["all", "pretrain"], default="all",
                    help="pretrain: pretraining and the pretrain row only (no fine-tuning): a cheaper screen")
    ap.add_argument("--baseline", default=BASELINE, choices=list(ARMS),
                    help="the arm the summary's differences are taken to (default image_only)")
    ap.add_argument("--summary", type=Path, nargs="+", default=None,
                    help="only print the table of these JSON files (e.g. the parts of a sweep run in two clones)")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                    help="only print B minus A, paired by (world, arm, seed), for two sweeps' JSON "
                         "(each side one file or several joined by commas)")
    ap.add_argument("--compare-arms", nargs=2, metavar=("ARM_A", "ARM_B"), default=None, choices=list(ARMS),
                    help="with --compare: ARM_B of B minus ARM_A of A, paired by (world, seed)")
    args = ap.parse_args()
    if args.compare_arms and not args.compare:
        ap.error("--compare-arms needs --compare A B")
    if args.summary:
        print(summary([r for path in args.summary for r in json.loads(path.read_text())["runs"]], args.baseline))
        return
    if args.compare:
        a, b = ([r for path in side.split(",") for r in json.loads(Path(path).read_text())["runs"]]
                for side in args.compare)
        print(compare_files(a, b, tuple(args.compare_arms) if args.compare_arms else None))
        return

    runs = json.loads(args.json.read_text())["runs"] if args.json and args.json.exists() else []
    here = cpu_name()  # a run on another CPU pairs with nothing run here: run it again
    done = {(r["world"], r["arm"], r["seed"], tuple(r["set"]), r.get("rows", "all")) for r in runs
            if r.get("cpu") == here}
    command = "python benchmarks/compare_modes.py " + " ".join(
        [f"--world {args.world}", f"--rows {args.rows}", *(f"--set {s}" for s in args.set)])
    # seed-major, every arm of a seed before the next seed: a stopped sweep leaves complete pairs
    def seeds_of(arm: str) -> list[int]:
        return args.seeds if arm in (BASELINE, "shared") else args.control_seeds
    plan = [(seed, arm) for seed in sorted({*args.seeds, *args.control_seeds}) for arm in args.arms
            if seed in seeds_of(arm)]
    for seed, arm in plan:
        sets = [f"seed={seed}", f"synth.seed={args.world}", *ARMS[arm], *args.set]
        if (args.world, arm, seed, tuple(sets), args.rows) in done:
            continue
        r = run_experiment(args.world, arm, seed, args.set, args.rows)
        runs.append(r)
        print(f"world {args.world} seed {seed} {arm}: pretrain row {r['pretrain_mAP']:.2f} mAP, fine-tuned "
              f"{r['finetuned_mAP']} mAP, caption->image {r['caption_to_image_mAP']} in {r['wall_s']:.0f} s",
              flush=True)
        if args.json:
            _save(args.json, runs, command)
    print(summary(runs))


if __name__ == "__main__":
    main()
