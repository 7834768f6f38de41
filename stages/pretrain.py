"""pretrain: Stage I on the FineGPR-format set, images + captions through the shared fusion encoder.

One process, or `train.nproc` under torchrun (dmf_core.runtime.relaunch_under_torchrun); only
rank 0 writes.
"""

from __future__ import annotations

from dmf_core import paths
from dmf_core.config import Config
from dmf_core.runtime import run_stage


def main(cfg: Config) -> None:
    from dmf_core.train.loop import train_stage

    dataset = cfg.pretrain.dataset
    train_stage(cfg, "pretrain",
                train_lmdb=paths.lmdb_path(dataset, "train"),
                captions_parquet=paths.captions_parquet(dataset),
                caption_states=paths.caption_states_dir(),
                out_dir=paths.pretrain_model_dir(),
                metrics_path=paths.train_metrics_json("pretrain"),
                facts_path=paths.train_facts_json("pretrain"),
                curve_path=paths.PLOTS / "train" / "pretrain.tsv",
                work_dir=paths.RUNS / "pretrain")


if __name__ == "__main__":
    run_stage("pretrain", main, distributed=True)
