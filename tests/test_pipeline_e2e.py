"""End to end: the DVC pipeline in a temporary git repo, with a tiny parameter override.

`dvc repro` builds everything, a second `dvc repro` runs nothing and `dvc metrics diff` shows
nothing, neither after it nor after a forced re-run of an evaluation with the same inputs (no
machine-dependent value in a metrics file); `dvc exp show` has the columns the layout promises;
`dvc exp run -S fusion.dim=...` re-runs pretraining and what follows (nothing upstream),
`dvc metrics diff` shows new numbers, and `dvc exp run -S pretrain.lr=...` changes the fine-tuned
model (no stale state is resumed). The caption states are encode_captions' cached output: no
experiment, in the workspace or `--temp`, encodes a caption again.
"""

from __future__ import annotations

import csv
import hashlib
import io
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
    params["pretrain"]["holdout_ids"] = 2
    params["finetune"]["sources"] = ["sp_market"]
    params["evaluate"]["rows"] = ["pretrain", "sp_market"]
    params["evaluate"]["targets"] = ["sp_cuhk"]
    params["evaluate"]["ranked_list_queries"] = 2
    return params


def _leaves(tree, prefix: str = "") -> dict:
    """``{"a.b.c": value}`` of a nested dict: one `dvc exp show` column per leaf."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _metric_columns(project: Path) -> dict[str, dict]:
    """metrics file -> its `dvc exp show` columns (leaf key -> value) in the workspace."""
    workspace = json.loads(_run(["dvc", "exp", "show", "--no-pager", "--json"], project))[0]
    assert workspace["rev"] == "workspace", workspace["rev"]
    return {path: _leaves(entry.get("data", {})) for path, entry in workspace["data"]["metrics"].items()}


def _exp_show_header(project: Path, *flags: str) -> list[str]:
    return next(csv.reader(io.StringIO(_run(["dvc", "exp", "show", "--no-pager", "--csv", *flags], project))))


def _expected_metric_columns(params: dict) -> dict[str, int]:
    """What the layout promises (docs/contracts.md, "Outputs"): per training stage the final
    losses (the mode's own term: align_loss with captions, teacher_loss with a teacher,
    attribute_loss with the attribute head) and the feature health (4 numbers, + caption->image
    mAP with captions); mAP and rank-1 per matrix cell (the pretrain row included), per row over
    its cross-domain cells and of its in-domain cell."""
    sources, targets = params["finetune"]["sources"], params["evaluate"]["targets"]
    mode = params["fusion"]["mode"]
    shared = mode == "shared"
    extra_term = (int(mode in ("shared", "prototypes", "phrases"))
                  + int(mode == "attributes" or params["fusion"].get("attribute_head", False)))
    rows = ["pretrain", *sources]
    in_domain = [s for s in sources if s in targets]
    # loss, id, triplet (+ align / attribute / teacher loss) and 4 health numbers (+ caption->image)
    return {"metrics/pretrain.json": 3 + extra_term + 4 + shared,
            **{f"metrics/finetune/{s}.json": 3 + 4 for s in sources},
            "metrics/eval_matrix.json": 2 * (len(rows) * len(targets) + len(rows) + len(in_domain))}


# Run facts and statistics: none may be a metric (they differ between runs and machines, or are
# not what a user compares).
NOT_METRICS = ("wall_s", "train_s", "images_per_s", "torch", "threads", "seed", "world_size",
               "effective_batch", "precision", "device", "resumed_from_epoch", "clearml_task",
               "untrained", "num_query", "num_gallery", "num_images", "num_classes", "bytes", "ids")


def _check_metrics_layout(project: Path, params: dict) -> int:
    """The metrics files and their columns are exactly the promised ones; `dvc exp show` has no
    other columns than its own, the metrics, the params and the deps. Returns the metric count."""
    columns = _metric_columns(project)
    assert {path: len(cols) for path, cols in columns.items()} == _expected_metric_columns(params), columns
    for path, cols in columns.items():
        for name, value in cols.items():
            assert not any(part in NOT_METRICS for part in name.split(".")), (path, name)
            assert isinstance(value, float), (path, name, value)
    n_metrics = sum(len(cols) for cols in columns.values())
    n_params = len(_leaves(params))
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    n_deps = len({dep["path"] for stage in lock.values() for dep in stage.get("deps", [])})
    # Experiment, rev, typ, Created, parent (+ State, Executor while experiments are queued)
    header = _exp_show_header(project)
    assert len(header) <= 7 + n_metrics + n_params + n_deps, header
    return n_metrics


def _changed_deps(project: Path) -> dict[str, set[str]]:
    """`dvc status`: stage -> the deps it reports changed."""
    out = {}
    for stage, changes in json.loads(_run(["dvc", "status", "--json"], project)).items():
        deps = {path for c in changes if isinstance(c, dict) for path in c.get("changed deps", {})}
        if deps:
            out[stage] = deps
    return out


def _check_one_byte_reaches_its_stages(project: Path) -> None:
    """One byte more in a file that pretraining imports only inside a function (the feature-health
    check imports eval/ranking.py lazily): `dvc status` says pretrain changed, and every stage
    that runs that file, and no stage that does not; the byte removed, nothing is changed. Python's
bytecode caches beside the sources change nothing either."""
    path = project / "dmf_core/eval/ranking.py"
    original = path.read_bytes()
    assert _changed_deps(project) == {}
    # Bytecode of every module, imported or not by the last run, is no code change (.dvcignore).
    _run([sys.executable, "-m", "compileall", "-q", "dmf_core", "stages"], project)
    assert any(project.glob("dmf_core/train/__pycache__/*.pyc"))
    assert _changed_deps(project) == {}
    path.write_bytes(original + b"\n")
    try:
        changed = _changed_deps(project)
    finally:
        path.write_bytes(original)
    assert changed.get("pretrain") == {"dmf_core/eval/ranking.py"}, changed
    assert {"finetune@sp_market", "evaluate@pretrain-sp_cuhk"} <= set(changed), changed
    assert not any(s.startswith(("download", "captions", "encode_captions", "pack", "report")) for s in changed), changed
    assert _changed_deps(project) == {}


def _captions_encoded(project: Path) -> int:
    """How many captions pretraining encoded itself (its run facts)."""
    return json.loads((project / "reports/facts/pretrain.json").read_text())["run"]["captions_encoded"]


def _check_experiments_restore_caption_states(project: Path) -> None:
    """Experiments in a temporary directory (as queued ones run: a fresh checkout, no runs/)
    that change only the seed restore the caption states from the DVC cache: encode_captions
    does not run and pretraining encodes no caption."""
    for seed in (1, 2):
        out = _run(["dvc", "exp", "run", "--temp", "pretrain", "-S", f"seed={seed}"], project)
        assert "pretrain" in _ran_stages(out) and "encode_captions" not in _ran_stages(out), out
        assert "Stage 'encode_captions' didn't change" in out, out
    refs = _run(["git", "for-each-ref", "refs/exps", "--format=%(refname) %(objectname)"], project).splitlines()
    facts = [json.loads(_run(["git", "show", f"{rev}:reports/facts/pretrain.json"], project))["run"]
             for ref, rev in (line.split() for line in refs) if "/exec/" not in ref]
    by_seed = {f["seed"]: f["captions_encoded"] for f in facts if f["seed"] in (1, 2)}
    assert by_seed == {1: 0, 2: 0}, facts


def test_repro_then_noop_then_experiment(project):
    params = _tiny_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], project)
    _run(["git", "config", "user.name", "dmf tests"], project)  # dvc exp commits (CI has no identity)
    _run(["git", "config", "user.email", "tests@dmf.invalid"], project)
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-qm", "tiny project"], project)

    first = _run(["dvc", "repro"], project)
    assert "evaluate@sp_market-sp_cuhk" in _ran_stages(first)
    # The caption states are encode_captions' (cached) output; pretraining encodes none itself.
    assert "encode_captions" in _ran_stages(first)
    encoded = json.loads((project / "reports/facts/encode_captions.json").read_text())["captions_encoded"]
    assert encoded == json.loads((project / "data/caption_states/info.json").read_text())["captions"] > 0
    assert _captions_encoded(project) == 0
    cell = json.loads((project / "reports/eval/sp_market__sp_cuhk.json").read_text())
    pre_cell = json.loads((project / "reports/eval/pretrain__sp_cuhk.json").read_text())
    assert "untrained" not in cell  # computed once per target, by the pretrain row's cell
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        assert 0.0 <= cell[key] <= 100.0 and 0.0 <= pre_cell["untrained"][key] <= 100.0
    assert "evaluate@pretrain-sp_cuhk" in _ran_stages(first)
    metric = json.loads((project / "metrics/eval_matrix.json").read_text())
    two = ("mAP", "rank1")
    assert metric == {"cells": {"pretrain": {"sp_cuhk": {k: pre_cell[k] for k in two}},
                                "sp_market": {"sp_cuhk": {k: cell[k] for k in two}}},
                      "cross_domain": {"pretrain": {k: pre_cell[k] for k in two},
                                       "sp_market": {k: cell[k] for k in two}},
                      "in_domain": {}}
    health = json.loads((project / "metrics/pretrain.json").read_text())["health"]
    assert -1.0 <= health["cosine_other_id"] < health["cosine_same_id"] <= 1.0
    matrix = json.loads((project / "reports/eval_matrix.json").read_text())
    assert matrix["cells"]["sp_market"]["sp_cuhk"]["untrained"] == pre_cell["untrained"]
    matrix_md = (project / "reports/eval_matrix.md").read_text()
    assert "sp_market" in matrix_md and "sp_cuhk" in matrix_md
    assert (project / "reports/eval_heatmap.png").stat().st_size > 1000
    assert (project / "reports/ranked/sp_market__sp_cuhk.png").stat().st_size > 1000
    assert (project / "models/pretrain/model.safetensors").exists()
    assert json.loads((project / "reports/stats/captions.json").read_text())
    assert json.loads((project / "reports/stats/datasets/sp_cuhk.json").read_text())["splits"]["query"]["images"]
    assert json.loads((project / "reports/stats/pack/sp_cuhk.json").read_text())["gallery"]["bytes"] > 0
    facts = json.loads((project / "reports/facts/evaluate/sp_market__sp_cuhk.json").read_text())
    assert facts["wall_s"] > 0 and facts["torch"]
    n_metrics = _check_metrics_layout(project, params)
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-qm", "baseline results"], project)

    second = _run(["dvc", "repro"], project)
    assert _ran_stages(second) == set(), second
    assert json.loads(_run(["dvc", "metrics", "diff", "--json"], project)) == {}
    _check_one_byte_reaches_its_stages(project)

    # The same inputs again: new run facts, byte-identical results, so `report` stays up to date
    # and the metrics do not move when it is forced too.
    rerun = _run(["dvc", "repro", "-f", "-s", "evaluate@sp_market-sp_cuhk"], project)
    assert _ran_stages(rerun) == {"evaluate@sp_market-sp_cuhk"}, rerun
    assert _ran_stages(_run(["dvc", "repro"], project)) == set()
    assert _ran_stages(_run(["dvc", "repro", "-f", "-s", "report"], project)) == {"report"}
    assert json.loads(_run(["dvc", "metrics", "diff", "--json"], project)) == {}
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-qm", "re-run facts", "--allow-empty"], project)  # wall_s may round alike

    exp = _run(["dvc", "exp", "run", "-S", "fusion.dim=32"], project)
    ran = _ran_stages(exp)
    assert {"pretrain", "finetune@sp_market", "evaluate@sp_market-sp_cuhk", "report"} <= ran, exp
    assert not any(s.startswith(("download", "pack", "captions", "encode_captions")) for s in ran), ran
    assert _captions_encoded(project) == 0

    diff = json.loads(_run(["dvc", "metrics", "diff", "--json"], project))
    matrix_diff = diff["metrics/eval_matrix.json"]
    changed = [k for k in ("rank1", "mAP") if matrix_diff.get(f"cells.sp_market.sp_cuhk.{k}", {}).get("diff")]
    assert changed, matrix_diff
    assert set(diff) <= set(_expected_metric_columns(params)), diff
    # Side by side, only what differs: the changed metrics, fusion.dim and the deps downstream of it
    # (models/pretrain, models/sp_market, reports/eval).
    only_changed = _exp_show_header(project, "--only-changed")
    assert "fusion.dim" in only_changed and len(only_changed) <= 7 + n_metrics + 1 + 3, only_changed

    # Another pretraining must reach the fine-tuned model: no state of the last fine-tuning
    # may be resumed as "done" (runs/finetune/ persists between runs).
    finetuned = project / "models/sp_market/model.safetensors"
    before = hashlib.sha256(finetuned.read_bytes()).hexdigest()
    exp = _run(["dvc", "exp", "run", "-S", "pretrain.lr=0.003"], project)
    assert {"pretrain", "finetune@sp_market"} <= _ran_stages(exp), exp
    assert hashlib.sha256(finetuned.read_bytes()).hexdigest() != before
    run = json.loads((project / "reports/facts/finetune/sp_market.json").read_text())["run"]
    assert run["resumed_from_epoch"] == 0

    _check_experiments_restore_caption_states(project)  # last: its experiments join `dvc exp show`
