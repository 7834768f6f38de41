"""finetune@<source>: Stage II on one real (or SynthPed) source, image path only, from Stage I weights.

One process, or `train.nproc` under torchrun (dmf_core.runtime.relaunch_under_torchrun); only
rank 0 writes.
"""

from __future__ import annotations

import argparse

from dmf_core import paths
from dmf_core.config import Config
from dmf_core.runtime import run_stage


def main(cfg: Config, source: str) -> None:
    from dmf_core.train.loop import train_stage

    cfg.dataset(source)
    train_stage(cfg, "finetune",
                train_lmdb=paths.lmdb_path(source, "train"),
                init_from=paths.pretrain_model_dir(),
                dataset_name=source,
                out_dir=paths.finetune_model_dir(source),
                metrics_path=paths.train_metrics_json("finetune", source),
                facts_path=paths.train_facts_json("finetune", source),
                curve_path=paths.PLOTS / "train" / f"finetune_{source}.tsv",
                work_dir=paths.RUNS / "finetune" / source)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source", help="a dataset listed in finetune.sources")
    args = parser.parse_args()
    run_stage(f"finetune@{args.source}", lambda cfg: main(cfg, args.source), distributed=True)
