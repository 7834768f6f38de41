"""Fault injection, interrupted runs: SIGKILL a deterministic stage mid-way, `dvc repro` again,
and get the same bytes as an uninterrupted run; Ctrl-C a torchrun stage and leave no stale lock.

A throw-away copy of the pipeline (dvc.yaml, stages/, dmf_core/, .dvc/config) with a tiny
params.yaml runs in a temporary git repo, as in test_pipeline_e2e.py; each test has its own, so
none depends on another or on their order. The kill points are drawn from a fixed seed, printed
with each kill; DMF_FAULT_SEED=<n> draws others. Training resume after SIGKILL is
covered by test_train.py::test_resume_after_sigkill_matches_uninterrupted_run (bit-identical).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from _faults import ROOT, env_with_venv, make_project, run, tree_digest

pytestmark = pytest.mark.slow

STAGES = ["download@synthped", "captions", "pack@synthped"]
OUTPUTS = ["data/raw/synthped", "data/manifests/synthped.parquet", "data/captions", "data/lmdb/synthped"]


def _tiny(params: dict) -> dict:
    params["datasets"] = {k: params["datasets"][k] for k in ("synthped", "sp_market")}
    params["synth"] = {k: v for k, v in params["synth"].items() if k not in ("sp_cuhk", "sp_msmt")}
    params["synth"]["synthped"].update(ids=8, images_per_id=6)
    params["synth"]["sp_market"].update(train_ids=4, test_ids=4)
    params["model"]["image"].update(depth=1, dim=32, heads=2, height=64, width=32)
    params["fusion"].update(dim=32, layers=1, heads=2, mode="image_only")
    params["pretrain"].update(epochs=2, P=4, K=2, holdout_ids=2)
    params["finetune"].update(epochs=1, P=4, K=2, sources=["sp_market"])
    params["evaluate"].update(targets=["sp_market"], rows=["pretrain", "sp_market"], ranked_list_queries=1)
    return params


FAULT_SEED = 20261205  # the kill points' default seed: a run is reproducible


@pytest.fixture
def project(tmp_path) -> Path:
    """A fresh tiny project per test: no test leans on what another one built."""
    params = _tiny(yaml.safe_load((ROOT / "params.yaml").read_text()))
    return make_project(tmp_path / "proj", params)


def _fault_seed() -> int:
    return int(os.environ.get("DMF_FAULT_SEED", FAULT_SEED))


def _digest(project: Path) -> dict[str, str]:
    return {str(Path(k).relative_to(project)): v for k, v in tree_digest(*(project / o for o in OUTPUTS)).items()}


def _script_running(pgid: int, script: str) -> bool:
    """Is ``stages/<script>`` running in process group ``pgid`` (read from /proc)?"""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            if script.encode() in (entry / "cmdline").read_bytes():
                return True
        except (OSError, ProcessLookupError):
            continue
    return False


def _repro(stage: str, cwd: Path, kill_fraction: float | None = None, script_s: float = 0.0):
    """`dvc repro -f -s stage`; returns (seconds the stage script ran, killed?).

    With ``kill_fraction``, SIGKILL the whole process group (dvc and the stage script alike, as a
    lost session or the OOM killer would) ``kill_fraction * script_s`` after the script started.
    """
    script = f"stages/{stage.split('@')[0]}.py"
    proc = subprocess.Popen(["dvc", "repro", "-f", "-s", stage], cwd=cwd, env=env_with_venv(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not _script_running(proc.pid, script) and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    if kill_fraction is None:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        return time.monotonic() - started, False
    try:
        proc.wait(timeout=kill_fraction * script_s)
        killed = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        killed = True
    proc.stderr.close()
    return time.monotonic() - started, killed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _repro_after_kill(project: Path, target: str, lock_before: bytes, where: str) -> None:
    """`dvc repro target` after a kill. dvc rewrites dvc.lock in place (not atomically): a SIGKILL in
    that instant leaves it empty and dvc refuses to load it. The recovery is the committed dvc.lock
    (`git checkout dvc.lock`, simulated with the copy taken before the kill), then `dvc repro`.
    dvc writes `.dvc/tmp/rwlock` in place too: a kill in that instant leaves it empty, and the
    documented recovery (docs/reliability.md) is to remove it while no dvc runs."""
    out = run(["dvc", "repro", target], project, check=False, timeout=400)
    if out.returncode and "Unable to read RWLock-file" in out.stderr + out.stdout:
        print(f"{where}: .dvc/tmp/rwlock left unreadable by the kill; removed")
        (project / ".dvc" / "tmp" / "rwlock").unlink()
        out = run(["dvc", "repro", target], project, check=False, timeout=400)
    if out.returncode and "dvc.lock' validation failed" in out.stderr + out.stdout:
        print(f"{where}: dvc.lock lost by the kill ({(project / 'dvc.lock').stat().st_size} bytes); restored")
        (project / "dvc.lock").write_bytes(lock_before)
        out = run(["dvc", "repro", target], project, check=False, timeout=400)
    assert out.returncode == 0, f"{where}: {out.stdout[-2000:]}\n{out.stderr[-3000:]}"


def test_sigkill_each_data_stage_then_repro_is_byte_identical(project):
    seed = _fault_seed()
    rng = random.Random(seed)
    run(["dvc", "repro", *STAGES], project)
    script_s = {stage: _repro(stage, project)[0] for stage in STAGES}  # reference, timed (-f: re-run)
    want = _digest(project)
    assert any(k.startswith("data/lmdb/") for k in want) and any(k.startswith("data/captions/") for k in want)
    kills = []
    for stage in STAGES:
        fraction = rng.uniform(0.1, 0.8)
        lock_before = (project / "dvc.lock").read_bytes()
        _, killed = _repro(stage, project, kill_fraction=fraction, script_s=script_s[stage])
        kills.append(killed)
        where = f"seed {seed}: {stage} killed={killed} at {fraction:.2f} of {script_s[stage]:.2f}s"
        print(where)
        _repro_after_kill(project, stage, lock_before, where)
        got = _digest(project)
        assert got == want, f"{where}; differs: {sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))[:5]}"
    assert sum(kills) >= 2, f"seed {seed}: the stages finished before the kill point too often ({kills})"
    status = run(["dvc", "status", *STAGES], project).stdout.splitlines()
    stale = [line for line in status if line.rstrip(":") in STAGES]
    assert stale == [], "\n".join(status)


def test_ctrl_c_during_torchrun_stage_leaves_no_process_and_no_lock(project):
    """Ctrl-C while pretrain trains under torchrun, 2 processes: the stage replaced itself by the
    torchrun agent."""
    run(["dvc", "repro", "pretrain"], project)  # everything pretraining reads, and a short first run
    _clear(project / "runs")  # the wait below looks for the long run's first saved state
    params_file = project / "params.yaml"
    tiny = params_file.read_text()
    long_run = yaml.safe_load(tiny)
    long_run["pretrain"]["epochs"] = 1000  # cannot finish before the Ctrl-C, however fast the machine
    long_run["train"]["nproc"] = 2
    params_file.write_text(yaml.safe_dump(long_run, sort_keys=False))
    proc = subprocess.Popen(["dvc", "repro", "-s", "pretrain"], cwd=project, env=env_with_venv(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    runs = project / "runs" / "pretrain"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not any(runs.glob("*")):
        time.sleep(0.2)  # wait until training has really started: the first epoch's state is saved
    params_file.write_text(tiny)
    assert proc.poll() is None, f"pretrain ended before Ctrl-C: {proc.stdout.read()[-3000:]}"
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C goes to the whole foreground group
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("dvc repro did not exit within 60 s of Ctrl-C")
    end = time.monotonic() + 20
    while _alive(proc.pid) and time.monotonic() < end:
        time.sleep(0.2)
    assert not _alive(proc.pid), "a torchrun worker outlived Ctrl-C"
    assert proc.returncode != 0
    rwlock = project / ".dvc" / "tmp" / "rwlock"
    if rwlock.exists():
        # SIGKILLed dvc processes leave entries behind; dvc skips entries of dead pids, so they do
        # not block. The Ctrl-C'd dvc must have removed its own, and no holder may be alive.
        holders = [e["pid"] for kind in json.loads(rwlock.read_text() or "{}").values()
                   for entries in kind.values() for e in entries]
        assert proc.pid not in holders
        assert not [p for p in holders if _pid_alive(p)], rwlock.read_text()
    assert not list((project / "data" / "lmdb").rglob("*-lock"))  # readers open with lock=False
    out = run(["dvc", "repro", "pretrain"], project, check=False, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (project / "models" / "pretrain" / "model.safetensors").is_file()


def _clear(work: Path) -> None:
    """Empty a training stage's runs/ folder: the next run trains from scratch, not resumes at the end."""
    for p in sorted(work.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()


def _results(project: Path) -> dict:
    """What the training and downstream stages produce, minus wall-clock facts."""
    out = {"eval": json.loads((project / "reports/eval/sp_market__sp_market.json").read_text()),
           "matrix_md": (project / "reports/eval_matrix.md").read_text(),
           "matrix": json.loads((project / "reports/eval_matrix.json").read_text()),
           "metrics": [json.loads((project / f"metrics/{name}.json").read_text())
                       for name in ("pretrain", "finetune/sp_market", "eval_matrix")]}
    out.update(tree_digest(project / "models/pretrain/model.safetensors",
                           project / "models/sp_market/model.safetensors"))
    return out


def test_sigkill_training_evaluate_report_then_repro_gives_the_same_results(project):
    """pretrain, finetune (killed mid-run: resume from runs/ or restart), evaluate, report: after
    `dvc repro`, bit-identical weights and the same metrics as an uninterrupted run."""
    seed = _fault_seed() + 1
    rng = random.Random(seed)
    stages = ["pretrain", "finetune@sp_market", "evaluate@sp_market-sp_market", "report"]
    run(["dvc", "repro", "pretrain", "compose@sp_market", "evaluate@pretrain-sp_market"], project, timeout=400)
    _clear(project / "runs")
    script_s = {stage: _repro(stage, project)[0] for stage in stages}  # the uninterrupted reference, timed
    want = _results(project)
    for stage in stages:
        if stage in ("pretrain", "finetune@sp_market"):  # from scratch (runs/ persists)
            _clear(project / "runs" / stage.split("@")[0])
        fraction = rng.uniform(0.3, 0.8)
        lock_before = (project / "dvc.lock").read_bytes()
        _, killed = _repro(stage, project, kill_fraction=fraction, script_s=script_s[stage])
        where = f"seed {seed}: {stage} killed={killed} at {fraction:.2f} of {script_s[stage]:.2f}s"
        print(where)
        _repro_after_kill(project, "report", lock_before, where)
        assert _results(project) == want, f"seed {seed}: {stage} killed at {fraction:.2f}"
