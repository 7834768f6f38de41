"""A fine-tuning row's plan: the packed splits of its datasets that it trains on.

The ``compose`` stage writes it, ``data/rows/<row>.json`` (:func:`compose_row`): for each dataset
of the row (:mod:`dmf_core.rows`), the packed splits it trains on with their content digests and
counts. The stage depends on all of ``data/lmdb``, as DVC cannot list a variable number of
dependencies; its output changes only when a split the row reads does, so fine-tuning, which
depends on the plan, re-runs only then. :mod:`dmf_core.data.loading.union` reads it. No torch here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from dmf_core import paths
from dmf_core.data.store.lmdb_store import LmdbReader, content_digest
from dmf_core.rows import row_parts

log = logging.getLogger(__name__)

PLAN_FORMAT = 2
TEST_SPLITS = ("query", "gallery")


def distractor_pids(layout: str) -> list[int]:
    """pids that are no identity in a dataset's test splits (torchreid's Market ``_junk_pids``)."""
    return [0] if layout == "market" else []


def compose_row(row: str, splits: list[str], layouts: dict[str, str], *,
                lmdb_path: Callable[[str, str], Path] = paths.lmdb_path) -> dict:
    """The plan of ``row``: per dataset, the packed splits of ``splits`` it has (CUHK-SYSU has
    only train) and, under ``health``, its query and gallery when it does not train on them (the
    images fine-tuning's feature health is measured on), each with its digest and counts.
    ``layouts``: dataset -> layout; ``lmdb_path``: (dataset, split) -> its packed LMDB."""
    parts = []
    for name in row_parts(row):
        train = lmdb_path(name, "train")
        if not train.exists():
            raise FileNotFoundError(f"{row}: {train} is missing; run `dvc repro pack@{name}` first")
        part = {"dataset": name, "layout": layouts[name], "drop_pids": distractor_pids(layouts[name]),
                "splits": {}, "absent": [], "health": {}}
        for split in [*splits, *(s for s in TEST_SPLITS if s not in splits)]:
            path = lmdb_path(name, split)
            if path.exists():
                part["splits" if split in splits else "health"][split] = _split_record(path)
            elif split in splits:
                part["absent"].append(split)
                log.info("%s: %s has no %s split; it trains on the others", row, name, split)
        parts.append(part)
    return {"format": PLAN_FORMAT, "row": row, "parts": parts}


def _split_record(path: Path) -> dict:
    reader = LmdbReader(path)
    return {"lmdb": path.as_posix(), "digest": content_digest(path), "images": len(reader),
            "ids": int(reader.sidecar["pid"].nunique())}


def check_listed(cfg, row: str) -> None:
    """ValueError for a row not in ``finetune.sources`` (a stage run by hand). A pre-run check: it
    reads finetune.sources without its being the stages' param, since adding a row must not
    re-run the others (tests/test_stage_params.py)."""
    if row not in cfg.finetune.sources:
        raise ValueError(f"{row!r} is not a row of finetune.sources {cfg.finetune.sources}")


def check_plan(cfg, plan: dict) -> None:
    """ValueError when the plan was composed for other ``finetune.splits`` or layouts than the
    params give (fine-tuning run by hand after an edit, before compose). A pre-run check, as
    :func:`check_listed`."""
    splits = sorted(cfg.finetune.splits)
    for part in plan["parts"]:
        planned, layout = sorted([*part["splits"], *part["absent"]]), cfg.datasets[part["dataset"]].layout
        if planned != splits or part["layout"] != layout:
            raise ValueError(f"the plan of {plan['row']!r} was composed for splits {planned} and layout "
                             f"{part['layout']!r} of {part['dataset']}, the params say {splits} and "
                             f"{layout!r}; rerun `dvc repro compose@{plan['row']}`")


def read_row_plan(path: Path, row: str) -> dict:
    """The plan the ``compose`` stage wrote for ``row``; ValueError naming the file if it is another's."""
    try:
        plan = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; run `dvc repro compose@{row}` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a plan ({exc}); rerun `dvc repro compose@{row}`") from None
    if not isinstance(plan, dict):
        raise ValueError(f"{path}: not a plan (a JSON {type(plan).__name__}); rerun `dvc repro compose@{row}`")
    if plan.get("format") != PLAN_FORMAT or plan.get("row") != row:
        raise ValueError(f"{path}: a plan of row {plan.get('row')!r} (format {plan.get('format')}), "
                         f"not of {row!r}; rerun `dvc repro compose@{row}`")
    return plan
