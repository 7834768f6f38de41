"""Metrics files and the ClearML offline mirror."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from dmf_core.runtime import StageError
from dmf_core.track import Tracker, write_metrics, write_tsv

# clearml is the `tracking` extra: installed in the dev venv (make venv), maybe not elsewhere.
needs_clearml = pytest.mark.skipif(importlib.util.find_spec("clearml") is None,
                                   reason="clearml not installed (pip install 'dmf[tracking]')")


def test_write_metrics_and_tsv(tmp_path):
    write_metrics(tmp_path / "a" / "m.json", {"loss": 1.5, "bad": float("nan"), "run": {"seed": 0}})
    assert json.loads((tmp_path / "a" / "m.json").read_text()) == {"loss": 1.5, "bad": None, "run": {"seed": 0}}
    write_tsv(tmp_path / "c.tsv", [{"epoch": 1, "loss": 0.123456789}], ["epoch", "loss", "lr"])
    assert (tmp_path / "c.tsv").read_text() == "epoch\tloss\tlr\n1\t0.123457\t\n"


def test_disabled_tracker_is_a_no_op():
    t = Tracker("none", "dmf", "x")
    t.scalar("loss", "loss", 1.0, 1)
    t.close()
    assert not t.active


@needs_clearml
def test_tracker_off_rank_0_is_a_no_op():
    assert not Tracker("offline", "dmf", "x", enabled=False).active


@needs_clearml
def test_clearml_offline_session_holds_the_scalars(monkeypatch):
    monkeypatch.setenv("CLEARML_OFFLINE_MODE", "1")
    t = Tracker("offline", "dmf-test", "unit", config={"fusion": {"dim": 32}}, tags=["test"])
    assert t.active, "ClearML offline task was not created"
    folder = Path(t.offline_folder)
    try:
        t.scalars("loss", {"id_loss": 1.5, "triplet_loss": 0.7}, 1)
        t.scalar("loss", "id_loss", 1.2, 2)
        t.close()
        events = [e for line in (folder / "metrics.jsonl").read_text().splitlines() for e in json.loads(line)]
        got = {(e["metric"], e["variant"], e["iter"]): e["value"] for e in events
               if e.get("type") == "training_stats_scalar"}
        assert got == {("loss", "id_loss", 1): 1.5, ("loss", "triplet_loss", 1): 0.7, ("loss", "id_loss", 2): 1.2}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        Path(str(folder) + ".zip").unlink(missing_ok=True)


@needs_clearml
def test_tracking_failure_never_raises(monkeypatch):
    import clearml

    def boom(*a, **k):
        raise RuntimeError("server unreachable")

    monkeypatch.setattr(clearml.Task, "init", boom)
    t = Tracker("server", "dmf", "x")
    assert not t.active
    t.scalar("loss", "loss", 1.0, 1)
    t.close()


@pytest.mark.parametrize("mode", ["offline", "server"])
@pytest.mark.parametrize("enabled", [True, False])  # off rank 0 too: every rank stops alike
def test_missing_clearml_is_a_clear_error_naming_the_extra(monkeypatch, mode, enabled):
    monkeypatch.setitem(sys.modules, "clearml", None)  # as if not installed
    with pytest.raises(StageError, match=r"tracking\.clearml is '\w+' but clearml is not installed: "
                                         r"pip install 'dmf\[tracking\]'"):
        Tracker(mode, "dmf", "x", enabled=enabled)


def test_missing_clearml_is_fine_when_tracking_is_off(monkeypatch):
    monkeypatch.setitem(sys.modules, "clearml", None)
    assert not Tracker("none", "dmf", "x").active
