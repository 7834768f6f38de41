"""Where every stage reads and writes, relative to the repository root (the DVC working dir)."""

from __future__ import annotations

from pathlib import Path

DATA = Path("data")
RAW = DATA / "raw"
MANIFESTS = DATA / "manifests"
CAPTIONS = DATA / "captions"
CAPTION_STATES = DATA / "caption_states"  # the frozen text encoder's token states of the captions
LMDB = DATA / "lmdb"
ROWS = DATA / "rows"  # per fine-tuning row, the packed splits it trains on (the compose stage)
ARCHIVES = DATA / "archives"
CHECKSUMS = DATA / "checksums.json"
MODELS = Path("models")
RUNS = Path("runs")
# What a stage writes falls in one of three kinds (docs/contracts.md, "Outputs"):
METRICS = Path("metrics")  # DVC metrics: only numbers to compare across experiments
PLOTS = METRICS / "plots"  # DVC plots (TSV)
REPORTS = Path("reports")  # for people: tables, pictures, per-cell records
STATS = REPORTS / "stats"  # dataset / caption / pack statistics (outputs, not metrics)
FACTS = REPORTS / "facts"  # run facts: seed, versions, threads, timings (outputs, not metrics)
EVAL_CELLS = REPORTS / "eval"  # one record per evaluation cell, what the report stage reads


def raw_dir(dataset: str) -> Path:
    return RAW / dataset


def manifest_path(dataset: str) -> Path:
    return MANIFESTS / f"{dataset}.parquet"


def lmdb_dir(dataset: str) -> Path:
    return LMDB / dataset


def lmdb_path(dataset: str, split: str) -> Path:
    return lmdb_dir(dataset) / f"{dataset}-{split}.lmdb"


def row_plan_json(row: str) -> Path:
    return ROWS / f"{row}.json"


def captions_parquet(dataset: str) -> Path:
    return CAPTIONS / ("finegpr.parquet" if dataset == "synthped" else f"{dataset}.parquet")


#: The matrix row of the pretrained model itself (no fine-tuning).
PRETRAIN_ROW = "pretrain"


def caption_states_dir() -> Path:
    """What ``encode_captions`` writes and pretraining reads (``dmf_core/train/caption_states.py``)."""
    return CAPTION_STATES


def row_model_dir(row: str) -> Path:
    """The model of a matrix row, ``models/<row>``: the pretrained one for ``pretrain``, else the
    one fine-tuned on the source ``row`` (one pattern, so the DVC matrix can name its dependency)."""
    return MODELS / row


def pretrain_model_dir() -> Path:
    return row_model_dir(PRETRAIN_ROW)


def finetune_model_dir(source: str) -> Path:
    return row_model_dir(source)


def dataset_stats_json(dataset: str) -> Path:
    return STATS / "datasets" / f"{dataset}.json"


def pack_stats_json(dataset: str) -> Path:
    return STATS / "pack" / f"{dataset}.json"


def captions_stats_json() -> Path:
    return STATS / "captions.json"


def train_metrics_json(stage: str, source: str | None = None) -> Path:
    return METRICS / "pretrain.json" if stage == "pretrain" else METRICS / "finetune" / f"{source}.json"


def train_facts_json(stage: str, source: str | None = None) -> Path:
    return FACTS / "pretrain.json" if stage == "pretrain" else FACTS / "finetune" / f"{source}.json"


def encode_captions_facts_json() -> Path:
    return FACTS / "encode_captions.json"


def eval_json(source: str, target: str) -> Path:
    """One evaluation cell: the five numbers, the untrained reference, query/gallery counts."""
    return EVAL_CELLS / f"{source}__{target}.json"


def eval_facts_json(source: str, target: str) -> Path:
    return FACTS / "evaluate" / f"{source}__{target}.json"


def eval_matrix_metrics_json() -> Path:
    """The DVC metric of the matrix: per cell the five numbers, per source their mean."""
    return METRICS / "eval_matrix.json"


def eval_matrix_json() -> Path:
    """The whole matrix (untrained reference, counts, sources, targets), not a metric."""
    return REPORTS / "eval_matrix.json"


def cmc_tsv(source: str, target: str) -> Path:
    return PLOTS / "cmc" / f"{source}__{target}.tsv"


def ranked_list_png(source: str, target: str) -> Path:
    return REPORTS / "ranked" / f"{source}__{target}.png"
