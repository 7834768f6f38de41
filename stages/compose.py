"""compose@<row>: which packed splits a fine-tuning row trains on -> data/rows/<row>.json.

A row is one dataset or several joined by '+' (dmf_core/rows.py); the plan lists, per dataset,
the splits of ``finetune.splits`` it has and their content digests. The stage depends on all of
data/lmdb (DVC cannot list a variable number of dependencies), but its output changes only when a
split the row reads does: fine-tuning, which depends on the plan, re-runs only then.
"""

from __future__ import annotations

import argparse

from dmf_core import paths
from dmf_core.config import Config
from dmf_core.rows import row_parts
from dmf_core.runtime import StageError, run_stage
from dmf_core.track import write_record


def check_listed(cfg: Config, row: str) -> None:
    """Refuse a row that is not in the matrix (a stage run by hand). A pre-run check: it reads
    finetune.sources without its being this stage's param, since adding a row must not re-run
    the others (tests/test_stage_params.py)."""
    if row not in cfg.finetune.sources:
        raise StageError(f"{row!r} is not a row of finetune.sources {cfg.finetune.sources}")


def main(cfg: Config, row: str) -> None:
    from dmf_core.data.loading.row_plan import compose_row

    check_listed(cfg, row)
    layouts = {name: cfg.dataset(name).layout for name in row_parts(row)}
    try:
        plan = compose_row(row, list(cfg.finetune.splits), layouts)
    except FileNotFoundError as exc:
        raise StageError(str(exc)) from None
    write_record(paths.row_plan_json(row), plan)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("row", help="a row of finetune.sources, e.g. sp_market or sp_market+sp_msmt")
    args = parser.parse_args()
    run_stage(f"compose@{args.row}", lambda cfg: main(cfg, args.row))
