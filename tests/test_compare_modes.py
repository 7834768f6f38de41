"""The sweep driver's statistics: pairs by (world, settings, seed) on one CPU, refuses duplicates,
says how many pairs crossed CPUs, and states the power of the comparison."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compare_modes", ROOT / "benchmarks" / "compare_modes.py")
cm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cm)


def _run(arm: str, seed: int, mAP: float, *, world: int = 0, cpu: str = "A", extra: tuple = ()) -> dict:
    sets = [f"seed={seed}", f"synth.seed={world}", *cm.ARMS[arm], *extra]
    return {"world": world, "arm": arm, "seed": seed, "set": sets, "cpu": cpu, "pretrain_mAP": mAP,
            "finetuned_mAP": mAP - 5, "caption_to_image_mAP": None}


def test_pairs_share_world_settings_seed_and_cpu():
    runs = [_run("image_only", 0, 70.0), _run("shared", 0, 72.0),
            _run("image_only", 1, 60.0, cpu="B"), _run("shared", 1, 90.0),         # baseline on another CPU
            _run("image_only", 2, 50.0, extra=("fusion.dim=512",)), _run("shared", 2, 99.0),  # other settings
            _run("image_only", 3, 65.0, world=1), _run("shared", 3, 10.0)]        # other world
    diffs, crossed = cm.paired(runs, "shared", "pretrain_mAP")
    assert diffs == [2.0] and crossed == 1


def test_a_duplicate_run_is_refused_not_averaged():
    runs = [_run("image_only", 0, 70.0), _run("shared", 0, 72.0), _run("shared", 0, 73.0)]
    with pytest.raises(SystemExit, match="more than one run"):
        cm.paired(runs, "shared", "pretrain_mAP")
    cm.paired([*runs[:2], _run("shared", 0, 73.0, cpu="B")], "shared", "pretrain_mAP")  # another CPU: fine


def test_power_of_paired_differences():
    # (t975(4) + t80(4)) * 3.42 / sqrt(5) = (2.776 + 0.941) * 1.5295
    assert cm.detectable(3.42, 5) == pytest.approx(5.685, abs=0.01)
    assert cm.seeds_needed(3.42) == 17 and cm.seeds_needed(1.0) == 4  # 2.5 points at 80 % power
    assert cm.detectable(1.0, cm.seeds_needed(1.0)) <= 2.5 < cm.detectable(1.0, cm.seeds_needed(1.0) - 1)
    table = cm.summary([_run("image_only", s, 70.0 + s) for s in range(5)]
                       + [_run("shared", s, 71.0 + s + (s % 2)) for s in range(5)])
    assert "| 0 (dev) | rows=all | shared | 5 |" in table and "| 0.55 | 0.91 | 3 |" in table


def test_pretrain_only_runs_pair_only_with_pretrain_only_runs():
    full = [_run("image_only", s, 70.0 + s) for s in range(3)]
    screen = [{**_run("image_only", s, 60.0), "rows": "pretrain", "finetuned_mAP": None} for s in range(3)]
    screen += [{**_run("shared", s, 62.0 + s % 2), "rows": "pretrain", "finetuned_mAP": None} for s in range(3)]
    table = cm.summary(full + screen)
    # the shared screen pairs with the image_only screen (+2, +3, +2), never with the full runs
    assert "| 0 (dev) | rows=pretrain | shared | 3 | 62.33 +- 0.58 | - | +2.33 [" in table
    assert "| 0 (dev) | rows=all | image_only | 3 |" in table


def test_the_summary_takes_differences_to_any_arm():
    runs = [_run("image_only", s, 70.0) for s in range(3)] + [_run("shared", s, 60.0 + s) for s in range(3)]
    runs += [{**_run("image_only", s, 0.0), "arm": "prototypes", "set": [f"seed={s}", "synth.seed=0",
                                                                        *cm.ARMS["prototypes"]]} for s in range(3)]
    for r in runs[6:]:
        r["pretrain_mAP"] = 63.0 + r["seed"]
    table = cm.summary(runs, baseline="prototypes")
    assert "pretrain mAP - prototypes" in table
    assert "| shared | 3 | 61.00 +- 1.00 | 56.00 +- 1.00 | -3.00 [-3.00, -3.00] |" in table  # 60-63, 61-64, 62-65


def test_compare_across_arms_pairs_by_world_and_seed_on_one_cpu():
    """--compare-arms: one arm of B minus another arm of A (e.g. the default at a new setting
    against the baseline at the old one), only over seeds both ran on the same CPU."""
    a = [{**_run("image_only", s, 60.0 + s), "wall_s": 1.0} for s in range(3)]
    a.append({**_run("prototypes", 0, 0.0), "wall_s": 1.0})  # another arm of A: not a pair
    b = [{**_run("prototypes", s, 62.0 + 2 * s), "wall_s": 1.0} for s in range(3)]
    b[2]["cpu"] = "B"  # seed 2 ran elsewhere: left out
    row = cm.compare_files(a, b, ("image_only", "prototypes")).splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "prototypes - image_only" and cells[2] == "2"
    assert cells[5].startswith("+2.50 [")  # seed 0: 62 - 60, seed 1: 64 - 61
    assert cm.compare_files(a, b).count("\n") == 2  # without arms: only prototypes seed 0 pairs


def test_compare_arms_without_compare_is_refused(monkeypatch, capsys):
    """--compare-arms only means something with --compare: alone it must not start a sweep."""
    monkeypatch.setattr("sys.argv", ["compare_modes.py", "--compare-arms", "image_only", "prototypes"])
    monkeypatch.setattr(cm, "run_experiment", lambda *a: pytest.fail("a sweep started"))
    with pytest.raises(SystemExit) as exit_info:
        cm.main()
    assert exit_info.value.code == 2
    assert "--compare-arms needs --compare" in capsys.readouterr().err
