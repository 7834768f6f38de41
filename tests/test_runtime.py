"""Stage logging: whole log lines next to progress bars, one INFO stream per torchrun job."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

MESSAGE = "a log line while the bar is drawn"

# A stage whose body logs while a tqdm bar is on the screen (the bar redraws on every update).
STAGE_WITH_BAR = textwrap.dedent(f"""
    import logging, sys
    from tqdm import tqdm
    from dmf_core.runtime import run_stage

    def body(cfg):
        with tqdm(total=4, desc="bar", file=sys.stderr, mininterval=0, ascii=True) as bar:
            bar.update(1)
            logging.getLogger("dmf.probe").info({MESSAGE!r})
            bar.update(1)

    run_stage("probe", body, params=sys.argv[1])
""")


def _python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code``; stderr as str with its carriage returns kept (no newline translation)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("DMF_LOG_LEVEL", "RANK")}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env={**environ, **env},
                          capture_output=True, timeout=120)
    proc.stderr = proc.stderr.decode()
    return proc


def test_a_log_line_during_a_progress_bar_comes_out_whole():
    proc = _python(STAGE_WITH_BAR, str(ROOT / "params.yaml"))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.split("\n") if MESSAGE in line]
    assert len(lines) == 1, proc.stderr
    # The bar is cleared ("\r" + blanks + "\r") before the line is written: what follows the last
    # carriage return is the log line alone, not glued to the text of the bar.
    shown = lines[0].split("\r")[-1]
    assert re.fullmatch(rf"\d\d:\d\d:\d\d dmf\.probe INFO {MESSAGE}", shown), repr(lines[0])
    after = proc.stderr.split(MESSAGE, 1)[1]
    assert "bar:" in after and "2/4" in after, "the bar was not redrawn below the log line"
    assert "probe done in" in proc.stderr


LOG_BOTH = ("import logging; from dmf_core.runtime import setup_logging; setup_logging(); "
            "log = logging.getLogger('dmf'); log.info('info line'); log.warning('warning line')")


@pytest.mark.parametrize(("env", "info", "warning"), [
    ({}, "dmf INFO info line", "dmf WARNING warning line"),
    ({"RANK": "0"}, "dmf INFO info line", "dmf WARNING warning line"),
    ({"RANK": "1"}, None, "[rank 1] dmf WARNING warning line"),
    ({"RANK": "3", "DMF_LOG_LEVEL": "info"}, "[rank 3] dmf INFO info line", "[rank 3] dmf WARNING warning line"),
    ({"DMF_LOG_LEVEL": "WARNING"}, None, "dmf WARNING warning line"),
])
def test_non_zero_ranks_log_warnings_only_by_default(env, info, warning):
    proc = _python(LOG_BOTH, **env)
    assert proc.returncode == 0, proc.stderr
    assert warning in proc.stderr
    if info is None:
        assert "info line" not in proc.stderr
    else:
        assert info in proc.stderr


# A training-like stage: each process records its torchrun environment and pid.
DISTRIBUTED_STAGE = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from dmf_core.runtime import run_stage

    def body(cfg):
        rank = os.environ.get("RANK", "none")
        Path(sys.argv[2], f"rank-{rank}.txt").write_text(f"{os.environ.get('WORLD_SIZE')} {os.getpid()}")

    run_stage("probe", body, params=sys.argv[1], distributed=True)
""")


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_distributed_stage_runs_in_one_process_or_under_torchrun(tmp_path, nproc):
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["nproc"] = nproc
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    script = tmp_path / "stage.py"
    script.write_text(DISTRIBUTED_STAGE)
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "params.yaml"), str(tmp_path)],
                            cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    records = {p.name: p.read_text().split() for p in tmp_path.glob("rank-*.txt")}
    if nproc == 1:  # no torchrun agent: the body ran in the very process that was started
        assert records == {"rank-none.txt": ["None", str(proc.pid)]}
    else:
        assert sorted(records) == ["rank-0.txt", "rank-1.txt"], err
        assert all(world == "2" for world, _ in records.values())
        assert all(int(pid) != proc.pid for _, pid in records.values())  # workers under the agent


def test_a_stray_local_rank_does_not_make_a_two_process_run_train_alone(tmp_path):
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["nproc"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "stage.py").write_text(DISTRIBUTED_STAGE)
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, str(tmp_path / "stage.py"), str(tmp_path / "params.yaml"), str(tmp_path)],
                          cwd=ROOT, env={**environ, "LOCAL_RANK": "0"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "LOCAL_RANK=0 is set without WORLD_SIZE" in proc.stderr
    assert not list(tmp_path.glob("rank-*.txt"))
