"""finetune@<row>: Stage II on a row's source dataset(s), image path only, from Stage I weights.

A row is one dataset or several trained on together (``market1501+cuhk03np+cuhksysu``): it reads
the plan the compose stage wrote, ``data/rows/<row>.json``. One process, or `train.nproc` under
torchrun (dmf_core.runtime.relaunch_under_torchrun); only rank 0 writes.
"""

from __future__ import annotations

import argparse

from dmf_core import paths
from dmf_core.config import Config
from dmf_core.runtime import StageError, run_stage


def check_listed(cfg: Config, row: str) -> None:
    """Refuse a row that is not in the matrix (a stage run by hand). A pre-run check: it reads
    finetune.sources without its being this stage's param, since adding a row must not re-run
    the others (tests/test_stage_params.py)."""
    if row not in cfg.finetune.sources:
        raise StageError(f"{row!r} is not a row of finetune.sources {cfg.finetune.sources}")


def main(cfg: Config, row: str) -> None:
    from dmf_core.data.loading.row_plan import read_row_plan
    from dmf_core.train.loop import train_stage

    check_listed(cfg, row)
    try:
        plan = read_row_plan(paths.row_plan_json(row), row)
    except (FileNotFoundError, ValueError) as exc:
        raise StageError(str(exc)) from None
    train_stage(cfg, "finetune",
                row_plan=plan,
                init_from=paths.pretrain_model_dir(),
                out_dir=paths.finetune_model_dir(row),
                metrics_path=paths.train_metrics_json("finetune", row),
                facts_path=paths.train_facts_json("finetune", row),
                curve_path=paths.PLOTS / "train" / f"finetune_{row}.tsv",
                work_dir=paths.RUNS / "finetune" / row)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("row", help="a row of finetune.sources, e.g. sp_market or sp_market+sp_msmt")
    args = parser.parse_args()
    run_stage(f"finetune@{args.row}", lambda cfg: main(cfg, args.row), distributed=True)
