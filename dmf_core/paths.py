"""Where every stage reads and writes, relative to the repository root (the DVC working dir)."""

from __future__ import annotations

from pathlib import Path

DATA = Path("data")
RAW = DATA / "raw"
MANIFESTS = DATA / "manifests"
CAPTIONS = DATA / "captions"
LMDB = DATA / "lmdb"
ARCHIVES = DATA / "archives"
CHECKSUMS = DATA / "checksums.json"
MODELS = Path("models")
RUNS = Path("runs")
METRICS = Path("metrics")
PLOTS = METRICS / "plots"
REPORTS = Path("reports")


def raw_dir(dataset: str) -> Path:
    return RAW / dataset


def manifest_path(dataset: str) -> Path:
    return MANIFESTS / f"{dataset}.parquet"


def lmdb_dir(dataset: str) -> Path:
    return LMDB / dataset


def lmdb_path(dataset: str, split: str) -> Path:
    return lmdb_dir(dataset) / f"{dataset}-{split}.lmdb"


def captions_parquet(dataset: str) -> Path:
    return CAPTIONS / ("finegpr.parquet" if dataset == "synthped" else f"{dataset}.parquet")


def pretrain_model_dir() -> Path:
    return MODELS / "pretrain"


def finetune_model_dir(source: str) -> Path:
    return MODELS / "finetune" / source


def eval_json(source: str, target: str) -> Path:
    return METRICS / "eval" / f"{source}__{target}.json"


def cmc_tsv(source: str, target: str) -> Path:
    return PLOTS / "cmc" / f"{source}__{target}.tsv"


def ranked_list_png(source: str, target: str) -> Path:
    return REPORTS / "ranked" / f"{source}__{target}.png"
