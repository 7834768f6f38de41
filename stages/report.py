"""report: every evaluation cell -> the cross-domain matrix (JSON, Markdown table, heatmap) and
its DVC metric (mAP and rank-1 per cell, per row the cross-domain and in-domain means). Rows: the
pretrained model (``pretrain``) and each fine-tuning row (one source, or several joined by '+')."""

from __future__ import annotations

from dmf_core import paths
from dmf_core.config import Config
from dmf_core.rows import row_parts
from dmf_core.runtime import StageError, run_stage
from dmf_core.track import write_metrics


def main(cfg: Config) -> None:
    from dmf_core.data.sources.registry import leakage_reason
    from dmf_core.eval.matrix import (
        build_matrix,
        load_eval_results,
        matrix_markdown,
        matrix_metrics,
        plot_heatmap,
    )

    results = load_eval_results(paths.EVAL_CELLS)
    wanted = {(r, t) for r in cfg.evaluate.rows for t in cfg.evaluate.targets}
    missing = sorted(wanted - set(results))
    if missing:
        raise StageError(f"missing evaluation results for {missing}; run the evaluate stages first")
    results = {key: value for key, value in results.items() if key in wanted}
    test_trained = len(cfg.finetune.splits) > 1  # Protocol-3: the sources' query and gallery too

    def leak(row: str, target: str) -> str | None:
        parts = [] if row == paths.PRETRAIN_ROW else row_parts(row)
        return next((why for part in parts if (why := leakage_reason(part, target, cfg.datasets,
                                                                     test_splits_trained=test_trained))), None)

    leaks = {(s, t): why for s, t in results if (why := leak(s, t))}
    matrix = build_matrix(results, not_transfer=leaks)
    write_metrics(paths.eval_matrix_metrics_json(), matrix_metrics(matrix))
    paths.REPORTS.mkdir(exist_ok=True)
    write_metrics(paths.eval_matrix_json(), matrix)
    (paths.REPORTS / "eval_matrix.md").write_text(matrix_markdown(matrix))
    plot_heatmap(matrix, paths.REPORTS / "eval_heatmap.png")


if __name__ == "__main__":
    run_stage("report", main)
