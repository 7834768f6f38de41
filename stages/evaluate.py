"""evaluate@<row>-<target>: CMC, mAP and mINP of the model of one matrix row (``pretrain``, the
pretrained model, or a fine-tuning source) on one target, and for the row ``pretrain`` of the same
architecture untrained, under the Market-1501 protocol."""

from __future__ import annotations

import argparse

from dmf_core.config import Config
from dmf_core.runtime import StageError, run_stage


def check_listed(cfg: Config, row: str, target: str) -> None:
    """Refuse a cell that is not in the matrix (a stage run by hand). A pre-run check: it reads
    evaluate.rows and evaluate.targets without their being this stage's params, since a source or
    target added to those lists must not re-run every cell (tests/test_stage_params.py)."""
    for name, listed, where in ((row, cfg.evaluate.rows, "evaluate.rows"),
                                (target, cfg.evaluate.targets, "evaluate.targets")):
        if name not in listed:
            raise StageError(f"{name!r} is not listed in {where} {listed}")


def main(cfg: Config, row: str, target: str) -> None:
    from dmf_core.eval.run import evaluate_cell

    check_listed(cfg, row, target)
    evaluate_cell(cfg, row, target)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("row", help="'pretrain' or a fine-tuning source (evaluate.rows)")
    parser.add_argument("target", help="a dataset listed in evaluate.targets")
    args = parser.parse_args()
    run_stage(f"evaluate@{args.row}-{args.target}", lambda cfg: main(cfg, args.row, args.target))
