"""encode_captions: the frozen text encoder's token states of every pretraining caption, once.

A cached DVC output (data/caption_states/), so that `dvc exp run`, `--queue` and `--temp`
experiments restore the states from the DVC cache instead of encoding every caption again;
pretraining reads them. Nothing to encode (fusion.mode other than shared, or a text encoder that
trains): the folder says so and pretraining reads none.
"""

from __future__ import annotations

from dmf_core import paths
from dmf_core.config import Config
from dmf_core.runtime import run_stage
from dmf_core.track import write_metrics


def main(cfg: Config) -> None:
    from dmf_core.train.caption_states import encode_caption_states

    facts = encode_caption_states(cfg, paths.captions_parquet(cfg.pretrain.dataset), paths.caption_states_dir())
    write_metrics(paths.encode_captions_facts_json(), facts)  # run facts, not a DVC metric


if __name__ == "__main__":
    run_stage("encode_captions", main)
