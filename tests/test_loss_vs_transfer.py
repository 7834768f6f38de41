"""benchmarks/loss_vs_transfer.py: sweep runs joined to the DVC experiments (git refs) that made
them, and the correlation of the final ID loss with transfer."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("loss_vs_transfer", ROOT / "benchmarks" / "loss_vs_transfer.py")
lvt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lvt)

TARGETS = ("t1", "t2")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def _params(seed: int = 0, mode: str = "image_only", margin: float = 0.3) -> str:
    return (f"seed: {seed}\nsynth:\n  seed: 0\nfusion:\n  mode: {mode}\nloss:\n  triplet_margin: {margin}\n"
            "train:\n  threads: 1\n")


def _baseline(repo: Path) -> str:
    """The commit experiments run on (params.yaml at its defaults); its hash."""
    (repo / "params.yaml").write_text(_params())
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "baseline")
    return _git(repo, "rev-parse", "HEAD")


def _experiment(repo: Path, ref: str, *, seed: int, mode: str, id_loss: list[float], cells: tuple[float, float],
                base: str, margin: float = 0.3):
    """Commit on ``base`` what a dvc exp run leaves (params, pretraining curve, pretrain-row cells) under ``ref``."""
    _git(repo, "checkout", "-q", base)
    (repo / "params.yaml").write_text(_params(seed, mode, margin))
    curve = repo / "metrics/plots/train/pretrain.tsv"
    curve.parent.mkdir(parents=True, exist_ok=True)
    curve.write_text("epoch\tid_loss\n" + "".join(f"{i + 1}\t{v}\n" for i, v in enumerate(id_loss)))
    for target, mAP in zip(TARGETS, cells):
        cell = repo / f"reports/eval/pretrain__{target}.json"
        cell.parent.mkdir(parents=True, exist_ok=True)
        cell.write_text(json.dumps({"mAP": mAP}))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", ref)
    _git(repo, "update-ref", ref, "HEAD")


def _truth(arm: str, seed: int) -> tuple[float, float]:
    """(final ID loss, pretrain-row mAP) of an experiment: the lower the loss, the higher the mAP;
    prototypes 0.1 lower on even seeds, 0.2 on odd ones."""
    final = 2.0 - 0.1 * seed - (0.1 + 0.1 * (seed % 2)) * (arm == "prototypes")
    return round(final, 4), round(60.0 + 50 * (2.0 - final), 4)


def _run(arm: str, seed: int, mAP: float) -> dict:
    sets = [f"seed={seed}", "synth.seed=0", f"fusion.mode={arm}", "train.threads=1"]
    return {"world": 0, "arm": arm, "seed": seed, "set": sets, "rows": "pretrain", "cpu": "A",
            "pretrain_mAP": mAP, "finetuned_mAP": None}


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    repo = tmp_path / "clone"
    repo.mkdir()
    _git(repo, "init", "-q")
    base = _baseline(repo)
    for seed in range(4):
        for arm in ("image_only", "prototypes"):
            final, mAP = _truth(arm, seed)
            _experiment(repo, f"refs/exps/ab/cd/{arm}-{seed}", seed=seed, mode=arm, id_loss=[4.0, final],
                        cells=(mAP - 1, mAP + 1), base=base)
    _git(repo, "update-ref", "refs/exps/exec/EXEC_BASELINE", "HEAD")  # DVC's bookkeeping: skipped
    return repo


def test_runs_join_the_experiment_that_made_them(clone: Path):
    exps = lvt.experiments(clone, TARGETS)
    assert len(exps) == 8 and all(not e["ref"].startswith("refs/exps/exec/") for e in exps)
    runs = [_run("image_only", 1, 65.0), _run("prototypes", 2, 75.0),
            _run("image_only", 1, 66.0),                                           # no experiment has this mAP
            {**_run("image_only", 1, 65.0), "set": [*_run("image_only", 1, 65.0)["set"], "fusion.dim=512"]}]
    joined, missing, ambiguous = lvt.join(runs, exps)
    assert (missing, ambiguous) == (2, 0)
    assert [(r["arm"], r["seed"], r["id_loss"]) for r in joined] == [("image_only", 1, [4.0, 1.9]),
                                                                     ("prototypes", 2, [4.0, 1.7])]
    assert joined[0]["final_id_loss"] == 1.9 and joined[0]["settings"] == "train.threads=1 rows=pretrain"


def test_lower_final_id_loss_higher_map_gives_negative_correlations(clone: Path):
    exps = lvt.experiments(clone, TARGETS)
    runs = [_run(arm, s, _truth(arm, s)[1]) for s in range(4) for arm in ("image_only", "prototypes")]
    joined, missing, ambiguous = lvt.join(runs, exps)
    assert (missing, ambiguous) == (0, 0) and len(joined) == 8
    groups, pairs = lvt.correlations([*joined, joined[0]], "image_only")  # one run in two sweep files
    assert sorted(groups["arm"]) == ["image_only", "prototypes"] and groups["runs"].tolist() == [4, 4]
    assert groups["spearman"].tolist() == pytest.approx([-1.0, -1.0])
    # the pairs differ by 0.1 or 0.2 in ID loss and 5 or 10 mAP: perfectly anti-correlated
    assert pairs["pairs"].tolist() == [4] and pairs["sd_difference"].tolist() == pytest.approx([2.8868], abs=1e-3)
    assert pairs["spearman"].tolist() == pytest.approx([-1.0]) and pairs["pearson"].tolist() == pytest.approx([-1.0])
    assert lvt.markdown(groups).startswith("| world | settings | arm | runs | spearman | pearson |")


def test_too_few_runs_give_no_correlation(clone: Path):
    joined, _, _ = lvt.join([_run("image_only", s, 60.0 + 5 * s) for s in range(3)], lvt.experiments(clone, TARGETS))
    groups, pairs = lvt.correlations(joined, "image_only")
    assert len(joined) == 3 and groups.empty and pairs.empty


def test_an_override_more_or_less_is_another_experiment(clone: Path):
    """A margin experiment that scored the same mAP is not the default run's experiment, and the
    default run is not the margin run's: every override must be the run's, no more, no fewer."""
    base = _git(clone, "rev-parse", "refs/exps/ab/cd/image_only-1^")
    _experiment(clone, "refs/exps/ab/cd/margin-1", seed=1, mode="image_only", id_loss=[4.0, 1.5],
                cells=(64.0, 66.0), base=base, margin=0.01)
    exps = lvt.experiments(clone, TARGETS)
    default, margin = _run("image_only", 1, 65.0), _run("image_only", 1, 65.0)
    margin["set"] = [*margin["set"], "loss.triplet_margin=0.01"]
    joined, missing, ambiguous = lvt.join([default, margin], exps)
    assert (missing, ambiguous) == (0, 0)
    assert [r["id_loss"] for r in joined] == [[4.0, 1.9], [4.0, 1.5]]
    assert joined[1]["settings"] == "loss.triplet_margin=0.01 train.threads=1 rows=pretrain"


def test_a_rerun_counts_once_and_disagreeing_twins_are_left_out(clone: Path):
    base = _git(clone, "rev-parse", "refs/exps/ab/cd/image_only-1^")
    run = _run("image_only", 1, 65.0)
    _experiment(clone, "refs/exps/ab/cd/rerun-1", seed=1, mode="image_only", id_loss=[4.0, 1.9],
                cells=(64.0, 66.0), base=base)  # the same run again, bit for bit
    joined, missing, ambiguous = lvt.join([run], lvt.experiments(clone, TARGETS))
    assert len(joined) == 1 and (missing, ambiguous) == (0, 0)
    _experiment(clone, "refs/exps/ab/cd/other-1", seed=1, mode="image_only", id_loss=[4.0, 1.8],
                cells=(64.0, 66.0), base=base)  # same settings and mAP, another curve: which made the run?
    joined, missing, ambiguous = lvt.join([run], lvt.experiments(clone, TARGETS))
    assert joined == [] and (missing, ambiguous) == (0, 1)


def test_outputs_of_this_script_are_not_read_as_sweep_runs(tmp_path: Path):
    """A glob over docs/results/ matches earlier outputs, whose joined runs would be read again."""
    run = {"world": 0, "arm": "image_only", "seed": 0, "set": [], "pretrain_mAP": 50.0}
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"command": "c", "runs": [run]}))
    earlier = tmp_path / "loss_vs_transfer.json"
    earlier.write_text(json.dumps({"command": "c", "groups": [], "pairs": [], "runs": [run, run]}))
    runs, read = lvt.sweep_runs([earlier, sweep])
    assert runs == [run]
    assert read == [sweep]
