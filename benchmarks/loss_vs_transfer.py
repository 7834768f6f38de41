"""Does a run's transfer follow how far its pretraining got? The sweeps' runs joined to their
pretraining curves.

``compare_modes.py`` keeps, per run, the pretrain row's mAP, not the training curve. Each run was
a ``dvc exp run`` in a sweep clone, and DVC keeps every experiment as a git ref (``refs/exps/``)
holding its params, ``metrics/pretrain.json``, the pretraining curve and the evaluation cells.
This script finds, for every run of the given sweep JSON files, the experiment of the given clones
that made it: the experiment's params are its baseline's (the commit it ran on) with exactly the
run's ``-S`` overrides applied, and its pretrain-row mAP is the run's (the mean of its three cells,
to the rounding). Runs with no such experiment (made in a clone since deleted, or on another
machine) are counted and left out, and so are runs that two experiments with different curves
match; an experiment re-run bit for bit matches twice and counts once.

Then, per (world, settings, arm) with at least 4 runs, the rank (Spearman) and linear (Pearson)
correlation across seeds between the final ID loss of pretraining (on the pretraining
identities: how far the optimisation got) and the pretrain-row mAP (transfer to unseen domains),
and per arm against a baseline, the correlation between the paired differences of the two.

    python benchmarks/loss_vs_transfer.py --clones /work/sweep /work/sweep2 \\
        --runs docs/results/test_w2.json docs/results/test_w3.json --json docs/results/loss_vs_transfer.json
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import io
import json
import subprocess
from pathlib import Path

import pandas as pd
import yaml

MIN_RUNS = 4  # a correlation over fewer seeds says nothing
TOLERANCE = 0.006  # mAP: the matrix's mean and the mean of the rounded cells differ by rounding only

_spec = importlib.util.spec_from_file_location("compare_modes", Path(__file__).with_name("compare_modes.py"))
compare_modes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_modes)


def _git(clone: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(clone), *args], capture_output=True, text=True, check=True).stdout


def _show(clone: Path, ref: str, path: str) -> str | None:
    proc = subprocess.run(["git", "-C", str(clone), "show", f"{ref}:{path}"], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def experiments(clone: Path, targets: tuple[str, ...]) -> list[dict]:
    """Every DVC experiment of ``clone`` that has params, a pretraining curve and the pretrain
    row's cells: its params, the ID loss per epoch and the row's mean mAP."""
    found = []
    for ref in _git(clone, "for-each-ref", "refs/exps", "--format=%(refname)").split():
        if ref.startswith("refs/exps/exec/"):  # DVC's own bookkeeping, not an experiment
            continue
        params, base = _show(clone, ref, "params.yaml"), _show(clone, f"{ref}^", "params.yaml")
        curve = _show(clone, ref, "metrics/plots/train/pretrain.tsv")
        cells = [_show(clone, ref, f"reports/eval/pretrain__{t}.json") for t in targets]
        if params is None or base is None or curve is None or None in cells:
            continue
        id_curve = [float(row["id_loss"]) for row in csv.DictReader(io.StringIO(curve), delimiter="\t")]
        if not id_curve:
            continue
        found.append({"ref": ref, "params": yaml.safe_load(params), "base": yaml.safe_load(base), "id_loss": id_curve,
                      "pretrain_mAP": sum(json.loads(c)["mAP"] for c in cells) / len(cells)})
    return found


def with_overrides(params: dict, overrides: list[str]) -> dict:
    """``params`` with ``key.sub=value`` overrides applied, as ``dvc exp run -S`` applies them."""
    out = copy.deepcopy(params)
    for override in overrides:
        key, value = override.split("=", 1)
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def made(run: dict, exp: dict) -> bool:
    """Whether experiment ``exp`` is the one that made sweep run ``run``: no override more or less."""
    return (with_overrides(exp["base"], run["set"]) == exp["params"]
            and abs(exp["pretrain_mAP"] - run["pretrain_mAP"]) <= TOLERANCE)


def join(runs: list[dict], exps: list[dict]) -> tuple[list[dict], int, int]:
    """The runs that an experiment made, each with its ID-loss curve; how many had no experiment,
    and how many had several whose curves differ."""
    joined, missing, ambiguous = [], 0, 0
    for run in runs:
        if run.get("pretrain_mAP") is None or "set" not in run:  # an older sweep's format
            missing += 1
            continue
        curves = {tuple(e["id_loss"]) for e in exps if made(run, e)}
        if len(curves) != 1:
            missing += not curves
            ambiguous += len(curves) > 1
            continue
        curve = list(curves.pop())
        joined.append({"world": run["world"], "arm": run["arm"], "seed": run["seed"],
                       "settings": " ".join(compare_modes.settings(run)), "cpu": run.get("cpu"),
                       "pretrain_mAP": run["pretrain_mAP"], "finetuned_mAP": run.get("finetuned_mAP"),
                       "final_id_loss": round(curve[-1], 4), "id_loss": [round(v, 4) for v in curve]})
    return joined, missing, ambiguous


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Rank correlation: Pearson's of the ranks (ties at their mean rank)."""
    return a.rank().corr(b.rank())


def correlations(joined: list[dict], baseline: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per (world, settings, arm): final ID loss against pretrain-row mAP across seeds; per arm
    against ``baseline``: the same for the paired differences (same world, settings, seed, CPU)."""
    df = pd.DataFrame(joined).drop_duplicates(["world", "settings", "arm", "seed", "cpu"])
    groups = []
    for (world, kept, arm), g in df.groupby(["world", "settings", "arm"]):
        if len(g) >= MIN_RUNS:
            groups.append({"world": world, "settings": kept, "arm": arm, "runs": len(g),
                           "spearman": spearman(g["final_id_loss"], g["pretrain_mAP"]),
                           "pearson": g["final_id_loss"].corr(g["pretrain_mAP"])})
    keys = ["world", "settings", "seed", "cpu"]
    base = df.loc[df["arm"] == baseline, [*keys, "pretrain_mAP", "final_id_loss"]]
    pairs = []
    for (world, kept, arm), g in df[df["arm"] != baseline].groupby(["world", "settings", "arm"]):
        both = g.merge(base, on=keys, suffixes=("", "_base"))
        if len(both) >= MIN_RUNS:
            d_map = both["pretrain_mAP"] - both["pretrain_mAP_base"]
            d_loss = both["final_id_loss"] - both["final_id_loss_base"]
            pairs.append({"world": world, "settings": kept, "arm": arm, "pairs": len(both),
                          "sd_difference": d_map.std(), "spearman": spearman(d_loss, d_map),
                          "pearson": d_loss.corr(d_map)})
    return pd.DataFrame(groups), pd.DataFrame(pairs)


def markdown(df: pd.DataFrame) -> str:
    rows = [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def sweep_runs(paths: list[Path]) -> tuple[list[dict], list[Path]]:
    """The runs of compare_modes.py JSON files, and the files read. This script's own outputs hold
    joined copies of runs (a glob over docs/results/ matches them), so they are skipped: each run
    is read once, from its sweep's file."""
    runs, read = [], []
    for path in paths:
        data = json.loads(path.read_text())
        if "groups" in data and "pairs" in data:  # written by this script
            continue
        runs += data["runs"]
        read.append(path)
    return runs, read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clones", type=Path, nargs="+", required=True, help="sweep clones (their dvc exp refs)")
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="compare_modes.py JSON files")
    ap.add_argument("--targets", nargs="+", default=["sp_market", "sp_cuhk", "sp_msmt"])
    ap.add_argument("--baseline", default=compare_modes.BASELINE)
    ap.add_argument("--json", type=Path, default=None, help="write the joined runs and the correlations here")
    args = ap.parse_args()

    mine = args.json.resolve() if args.json else None  # a glob over docs/results/ also matches the output
    runs, read = sweep_runs([p for p in args.runs if p.resolve() != mine])
    exps = [e for clone in args.clones for e in experiments(clone, tuple(args.targets))]
    joined, missing, ambiguous = join(runs, exps)
    print(f"{len(joined)} of {len(runs)} runs joined to their pretraining curve ({missing} without an "
          f"experiment, {ambiguous} with several that disagree)")
    if not joined:
        raise SystemExit("no run matched an experiment of these clones")
    groups, pairs = correlations(joined, args.baseline)
    print(markdown(groups) if len(groups) else "no (world, settings, arm) with enough runs")
    print()
    print(markdown(pairs) if len(pairs) else f"no arm with {MIN_RUNS} pairs")
    if args.json:
        args.json.write_text(json.dumps({
            "command": " ".join(["python benchmarks/loss_vs_transfer.py --clones", *map(str, args.clones),
                                 "--runs", *map(str, read),
                                 "--targets", *args.targets, "--baseline", args.baseline]),
            "groups": groups.round(4).to_dict("records"), "pairs": pairs.round(4).to_dict("records"),
            "runs": joined}, indent=2) + "\n")


if __name__ == "__main__":
    main()
