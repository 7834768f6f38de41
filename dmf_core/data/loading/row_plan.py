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

PLAN_FORMAT = 1


def distractor_pids(layout: str) -> list[int]:
    """pids that are no identity in a dataset's test splits (torchreid's Market ``_junk_pids``)."""
    return [0] if layout == "market" else []


def compose_row(row: str, splits: list[str], layouts: dict[str, str], *,
                lmdb_path: Callable[[str, str], Path] = paths.lmdb_path) -> dict:
    """The plan of ``row``: per dataset, the packed splits of ``splits`` it has (CUHK-SYSU has
    only train) with their digests and counts. ``layouts``: dataset -> layout; ``lmdb_path``:
    (dataset, split) -> its packed LMDB."""
    parts = []
    for name in row_parts(row):
        train = lmdb_path(name, "train")
        if not train.exists():
            raise FileNotFoundError(f"{row}: {train} is missing; run `dvc repro pack@{name}` first")
        part = {"dataset": name, "layout": layouts[name], "drop_pids": distractor_pids(layouts[name]),
                "splits": {}, "absent": []}
        for split in splits:
            path = lmdb_path(name, split)
            if not path.exists():
                part["absent"].append(split)
                log.info("%s: %s has no %s split; it trains on the others", row, name, split)
                continue
            reader = LmdbReader(path)
            part["splits"][split] = {"lmdb": path.as_posix(), "digest": content_digest(path),
                                     "images": len(reader), "ids": int(reader.sidecar["pid"].nunique())}
        parts.append(part)
    return {"format": PLAN_FORMAT, "row": row, "parts": parts}


def read_row_plan(path: Path, row: str) -> dict:
    """The plan the ``compose`` stage wrote for ``row``; ValueError naming the file if it is another's."""
    try:
        plan = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; run `dvc repro compose@{row}` first") from None
    if plan.get("format") != PLAN_FORMAT or plan.get("row") != row:
        raise ValueError(f"{path}: a plan of row {plan.get('row')!r} (format {plan.get('format')}), "
                         f"not of {row!r}; rerun `dvc repro compose@{row}`")
    return plan
