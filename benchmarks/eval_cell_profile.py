"""Where one evaluation cell's time goes: the steps of ``evaluate_cell``, timed one by one.

    .venv/bin/python benchmarks/eval_cell_profile.py [--source sp_market] [--target sp_cuhk]
        [--params params.yaml] [--stage]

Run from the root of a DVC project whose data stages have run (``data/lmdb/<target>``). Steps, in
the order ``evaluate_cell`` runs them, in this fresh interpreter: the imports (each module group
separately, cumulative as Python imports them), the config, opening the query/gallery LMDBs and
their loaders, loading the trained model (``models/<source>``, or ``models/pretrain`` for
the row ``pretrain``), extracting its query and gallery features, ranking, building the untrained
reference, its features and ranking, and the outputs (CMC TSV and ranked-list PNG, written to a
temporary folder, never into ``reports/``). Without the trained model the step is replaced by the
untrained build and marked so. ``--stage`` also times the whole
``python stages/evaluate.py <source> <target>`` in a subprocess (it needs the trained model and
writes the stage's outputs, as ``dvc repro`` would).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Steps:
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.last = time.perf_counter()

    def done(self, step: str, note: str = "") -> None:
        now = time.perf_counter()
        self.rows.append({"step": step, "s": round(now - self.last, 3), "note": note})
        self.last = now


def profile(source: str, target: str, params: str) -> list[dict]:
    steps = Steps()
    import numpy  # noqa: F401
    import torch

    steps.done("import numpy + torch")
    from dmf_core import paths
    from dmf_core.config import load_config
    from dmf_core.runtime import setup_logging  # noqa: F401  (what the stage imports)

    steps.done("import dmf_core config/runtime")
    from dmf_core.eval import run

    steps.done("import dmf_core.eval.run")
    from dmf_core.data.loading.loader import build_test_loader  # noqa: F401

    steps.done("import data loader (torchvision)")
    from dmf_core.model.build import DMFModel, build_model

    steps.done("import model build")
    from dmf_core.eval.features import extract_features  # noqa: F401
    from dmf_core.eval.matrix import write_cmc_tsv

    steps.done("import eval features/ranking/matrix")

    cfg = load_config(params)
    torch.set_num_threads(cfg.train.threads)
    steps.done("load config")
    splits = run.TargetSplits(cfg, target)
    n_q, n_g = len(splits.sidecars["query"]), len(splits.sidecars["gallery"])
    steps.done("open LMDBs + build loaders", f"{n_q} query, {n_g} gallery images")

    model_dir = paths.row_model_dir(source)
    if (model_dir / "model.safetensors").is_file():
        model, _ = DMFModel.from_pretrained(model_dir)
        steps.done("load trained model", str(model_dir))
    else:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, num_classes=1, with_text=False)
        steps.done("load trained model", f"{model_dir} missing: untrained build instead")
    feats = run._features(model, splits, cfg.evaluate.flip)
    steps.done("features (trained)", f"{n_q + n_g} images, batch {cfg.evaluate.batch_size}")
    result, _ = run._rank(cfg, feats, splits)
    steps.done("ranking (trained)", f"rank-1 {100 * float(result.cmc[0]):.1f}, {result.extra}")

    torch.manual_seed(cfg.seed)
    untrained = build_model(cfg, num_classes=1, with_text=False)  # as evaluate_cell (pretrain row only)
    steps.done("build untrained model")
    untrained_feats = run._features(untrained, splits, cfg.evaluate.flip)
    steps.done("features (untrained)")
    untrained_result, _ = run._rank(cfg, untrained_feats, splits)
    steps.done("ranking (untrained)", f"rank-1 {100 * float(untrained_result.cmc[0]):.1f}, {untrained_result.extra}")

    with tempfile.TemporaryDirectory() as tmp:
        write_cmc_tsv(result.cmc, Path(tmp) / "cmc.tsv")
        steps.done("write CMC TSV")
        if cfg.evaluate.ranked_list_queries:
            run._ranked_list(cfg, feats, splits, Path(tmp) / "ranked.png", model)
            maps = " + maps" if cfg.evaluate.ranked_list_maps else ""
            steps.done(f"ranked-list PNG{maps} (imports matplotlib)")
    steps.rows.insert(0, {"step": "interpreter start to first import", "s": None, "note": "not measured here"})
    steps.rows.append({"step": "total in this interpreter", "s": round(time.perf_counter() - STARTED, 3),
                       "note": ""})
    return steps.rows


def stage_wall(source: str, target: str) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "stages/evaluate.py", source, target], capture_output=True, text=True)
    note = "ok" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["failed"])[-1]
    return {"step": f"python stages/evaluate.py {source} {target}", "s": round(time.perf_counter() - t, 3),
            "note": note}


def bare_interpreter() -> dict:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return {"step": "bare `python -c pass`", "s": round(time.perf_counter() - t, 3), "note": ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="sp_market")
    ap.add_argument("--target", default="sp_cuhk")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--stage", action="store_true", help="also time the whole stage in a subprocess")
    args = ap.parse_args()
    rows = profile(args.source, args.target, args.params)
    rows.append(bare_interpreter())
    if args.stage:
        rows.append(stage_wall(args.source, args.target))
    for row in rows:
        print(json.dumps(row))
    print("| step | s | note |\n|---|---:|---|")
    for row in rows:
        print(f"| {row['step']} | {'' if row['s'] is None else row['s']} | {row['note']} |")


if __name__ == "__main__":
    main()
