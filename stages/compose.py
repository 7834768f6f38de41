"""compose@<row>: which packed splits a fine-tuning row trains on -> data/rows/<row>.json.

A row is one dataset or several joined by '+' (dmf_core/rows.py); the plan lists, per dataset,
the splits of ``finetune.splits`` it has and the query and gallery it does not train on (feature
health), with their content digests. The stage depends on all of data/lmdb (DVC cannot list a
variable number of dependencies), but its output changes only when a split the row reads does:
fine-tuning, which depends on the plan, re-runs only then.
"""

from __future__ import annotations

import argparse

from dmf_core import paths
from dmf_core.config import Config
from dmf_core.rows import row_parts
from dmf_core.runtime import StageError, run_stage
from dmf_core.track import write_record


def main(cfg: Config, row: str) -> None:
    from dmf_core.data.loading.row_plan import check_listed, compose_row

    try:
        check_listed(cfg, row)
        plan = compose_row(row, list(cfg.finetune.splits), {n: cfg.dataset(n).layout for n in row_parts(row)})
    except (FileNotFoundError, ValueError) as exc:
        raise StageError(str(exc)) from None
    write_record(paths.row_plan_json(row), plan)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("row", help="a row of finetune.sources, e.g. sp_market or sp_market+sp_msmt")
    args = parser.parse_args()
    run_stage(f"compose@{args.row}", lambda cfg: main(cfg, args.row))
