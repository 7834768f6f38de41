"""evaluate@<source>-<target>: CMC, mAP and mINP of the model fine-tuned on <source> (or of the
pretrained model, for the source ``pretrain``) on one target, and of the same architecture
untrained, under the Market-1501 protocol."""

from __future__ import annotations

import argparse

from dmf_core.config import Config
from dmf_core.paths import PRETRAIN_ROW
from dmf_core.runtime import StageError, run_stage


def main(cfg: Config, source: str, target: str) -> None:
    from dmf_core.eval.run import evaluate_cell

    rows = [PRETRAIN_ROW, *cfg.finetune.sources]
    for name, listed in ((source, rows), (target, cfg.evaluate.targets)):
        if name not in listed:
            raise StageError(f"{name!r} is not listed in ['pretrain'] + finetune.sources / evaluate.targets")
    evaluate_cell(cfg, source, target)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source")
    parser.add_argument("target")
    args = parser.parse_args()
    run_stage(f"evaluate@{args.source}-{args.target}", lambda cfg: main(cfg, args.source, args.target))
