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


def main(cfg: Config, row: str) -> None:
    from dmf_core.data.loading.row_plan import check_listed, check_plan, read_row_plan
    from dmf_core.data.loading.union import row_training
    from dmf_core.train.loop import train_stage

    try:
        check_listed(cfg, row)
        plan = read_row_plan(paths.row_plan_json(row), row)
        check_plan(cfg, plan)
    except (FileNotFoundError, ValueError) as exc:
        raise StageError(str(exc)) from None
    train_stage(cfg, "finetune",
                training_set=lambda rank, world_size, pin_memory: row_training(
                    plan, cfg, rank=rank, world_size=world_size, pin_memory=pin_memory),
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
