"""Metrics JSON (the source of truth DVC diffs) and an optional ClearML mirror.

ClearML is the ``tracking`` extra (``pip install 'dmf[tracking]'``). It is imported lazily and
only when ``tracking.clearml`` is ``offline`` or ``server``, only on rank 0, with framework
auto-logging off. Asking for it while it is not installed is a configuration error, raised on
every rank before any tracking; any other tracking failure is logged, never raised, so tracking
can never fail a stage.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from dmf_core.runtime import StageError

log = logging.getLogger(__name__)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_text(path: str | Path, text: str) -> None:
    """Create the folder, write a temporary file beside ``path``, then replace ``path`` with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_metrics(path: str | Path, metrics: dict) -> None:
    """Write ``metrics`` as indented JSON in their own order (atomic; non-finite numbers become null)."""
    _write_text(path, json.dumps(_json_safe(metrics), indent=2, sort_keys=False) + "\n")


def write_record(path: str | Path, record: dict) -> None:
    """Write a record (statistics, an evaluation cell) as indented JSON with sorted keys (atomic)."""
    _write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def write_tsv(path: str | Path, rows: list[dict], columns: list[str]) -> None:
    """A DVC plot file: header + one row per dict (floats with 6 significant digits)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(columns)]
    for row in rows:
        cells = []
        for col in columns:
            v = row.get(col, "")
            cells.append(f"{v:.6g}" if isinstance(v, float) else str(v))
        lines.append("\t".join(cells))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


TRACKING_INSTALL = "pip install 'dmf[tracking]'"


def require_clearml(mode: str) -> None:
    """Raise a StageError naming the extra when ``tracking.clearml: <mode>`` needs a missing clearml."""
    if mode != "none" and importlib.util.find_spec("clearml") is None:
        raise StageError(f"tracking.clearml is {mode!r} but clearml is not installed: "
                         f"{TRACKING_INSTALL} (or set tracking.clearml: none)")


class Tracker:
    """Mirror of scalars and configuration to ClearML; a no-op when disabled or off rank 0.

    Raises StageError when ``mode`` asks for ClearML and it is not installed (on every rank,
    ``enabled`` or not, so that all ranks of a run stop alike).
    """

    def __init__(self, mode: str, project: str, task_name: str, *, enabled: bool = True,
                 config: dict | None = None, tags: list[str] | None = None) -> None:
        self.mode = mode
        self.task = None
        self.logger = None
        require_clearml(mode)
        if mode == "none" or not enabled:
            return
        try:
            from clearml import Task

            if mode == "offline":
                Task.set_offline(offline_mode=True)
            self.task = Task.init(
                project_name=project, task_name=task_name, tags=tags,
                auto_connect_frameworks=False, auto_resource_monitoring=False,
                auto_connect_arg_parser=False, auto_connect_streams=False, reuse_last_task_id=False,
            )
            if config is not None:
                self.task.connect_configuration(_json_safe(config), name="params")
            self.logger = self.task.get_logger()
            log.info("ClearML %s task %s (%s/%s)", mode, self.task.id, project, task_name)
        except Exception as exc:  # noqa: BLE001 - tracking must never fail a stage
            log.warning("ClearML tracking disabled: %s: %s", type(exc).__name__, exc)
            self.task = None
            self.logger = None

    @property
    def offline_folder(self) -> str | None:
        """Where an offline session is stored (``None`` when not offline or disabled)."""
        if self.task is None or self.mode != "offline":
            return None
        try:
            return str(self.task.get_offline_mode_folder())
        except Exception:  # noqa: BLE001
            return None

    @property
    def active(self) -> bool:
        return self.logger is not None

    def scalar(self, title: str, series: str, value: float, iteration: int) -> None:
        if self.logger is None:
            return
        try:
            self.logger.report_scalar(title=title, series=series, value=float(value), iteration=iteration)
        except Exception as exc:  # noqa: BLE001
            log.warning("ClearML report_scalar(%s/%s) failed: %s", title, series, exc)

    def scalars(self, title: str, values: dict[str, float], iteration: int) -> None:
        for series, value in values.items():
            self.scalar(title, series, value, iteration)

    def single_values(self, values: dict[str, Any]) -> None:
        if self.logger is None:
            return
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                try:
                    self.logger.report_single_value(name, float(value))
                except Exception as exc:  # noqa: BLE001
                    log.warning("ClearML report_single_value(%s) failed: %s", name, exc)

    def close(self) -> None:
        if self.task is None:
            return
        try:
            self.logger.flush()
            self.task.close()
        except Exception as exc:  # noqa: BLE001
            log.warning("ClearML close failed: %s", exc)
        self.task = None
        self.logger = None
