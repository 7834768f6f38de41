"""End to end: the DVC pipeline in a temporary git repo, with a tiny parameter override.

`dvc repro` builds everything, a second `dvc repro` runs nothing, `dvc exp run -S fusion.dim=...`
re-runs pretraining and what follows (nothing upstream), `dvc metrics diff` shows new numbers, and
`dvc exp run -S pretrain.lr=...` changes the fine-tuned model (no stale state is resumed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["dvc.yaml", ".dvcignore", "stages", "dmf_core", "pyproject.toml"]

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path) -> str:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


def _ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("project")
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, repo / name)
    (repo / ".dvc").mkdir()
    shutil.copy2(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copy2(ROOT / ".dvc" / ".gitignore", repo / ".dvc" / ".gitignore")
    shutil.copy2(ROOT / ".gitignore", repo / ".gitignore")
    return repo


def _tiny_params(params: dict) -> dict:
    params["datasets"] = {k: params["datasets"][k] for k in ("synthped", "sp_market", "sp_cuhk")}
    for name in ("sp_msmt",):
        params["synth"].pop(name)
    params["synth"]["synthped"].update(ids=12, images_per_id=8)
    for name in ("sp_market", "sp_cuhk"):
        params["synth"][name].update(train_ids=12, test_ids=12)
    params["model"]["image"].update(depth=1, dim=64, heads=2, height=64, width=32)
    params["fusion"].update(dim=64, layers=1, heads=2)
    for stage in ("pretrain", "finetune"):
        params[stage].update(epochs=2, P=4, K=2)
    params["finetune"]["sources"] = ["sp_market"]
    params["evaluate"]["targets"] = ["sp_cuhk"]
    params["evaluate"]["ranked_list_queries"] = 2
    return params


def test_repro_then_noop_then_experiment(project):
    params = _tiny_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], project)
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-qm", "tiny project"], project)

    first = _run(["dvc", "repro"], project)
    assert "evaluate@sp_market-sp_cuhk" in _ran_stages(first)
    cell = json.loads((project / "metrics/eval/sp_market__sp_cuhk.json").read_text())
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        assert 0.0 <= cell[key] <= 100.0 and 0.0 <= cell["untrained"][key] <= 100.0
    matrix_md = (project / "reports/eval_matrix.md").read_text()
    assert "sp_market" in matrix_md and "sp_cuhk" in matrix_md
    assert (project / "reports/eval_heatmap.png").stat().st_size > 1000
    assert (project / "reports/ranked/sp_market__sp_cuhk.png").stat().st_size > 1000
    assert (project / "models/pretrain/model.safetensors").exists()
    captions = json.loads((project / "metrics/captions.json").read_text())
    assert captions

    second = _run(["dvc", "repro"], project)
    assert _ran_stages(second) == set(), second

    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-qm", "baseline results"], project)
    exp = _run(["dvc", "exp", "run", "-S", "fusion.dim=32"], project)
    ran = _ran_stages(exp)
    assert {"pretrain", "finetune@sp_market", "evaluate@sp_market-sp_cuhk", "report"} <= ran, exp
    assert not any(s.startswith(("download", "pack", "captions")) for s in ran), ran

    diff = json.loads(_run(["dvc", "metrics", "diff", "--json"], project))
    eval_diff = diff["metrics/eval/sp_market__sp_cuhk.json"]
    changed = [k for k in ("rank1", "rank5", "mAP", "mINP") if eval_diff.get(k, {}).get("diff")]
    assert changed, eval_diff

    # Another pretraining must reach the fine-tuned model: no state of the last fine-tuning
    # may be resumed as "done" (runs/finetune/ persists between runs).
    finetuned = project / "models/finetune/sp_market/model.safetensors"
    before = hashlib.sha256(finetuned.read_bytes()).hexdigest()
    exp = _run(["dvc", "exp", "run", "-S", "pretrain.lr=0.003"], project)
    assert {"pretrain", "finetune@sp_market"} <= _ran_stages(exp), exp
    assert hashlib.sha256(finetuned.read_bytes()).hexdigest() != before
    run = json.loads((project / "metrics/finetune/sp_market.json").read_text())["run"]
    assert run["resumed_from_epoch"] == 0
