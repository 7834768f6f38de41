"""One cell of the cross-domain matrix: a trained model (and the same architecture untrained)
evaluated on one target's query/gallery split under the Market-1501 protocol."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from dmf_core import paths
from dmf_core.config import Config, expected_lmdb_meta
from dmf_core.track import write_record

log = logging.getLogger(__name__)


class TargetSplits:
    """Query and gallery of one target: loaders, ids and cameras, and image access for pictures."""

    def __init__(self, cfg: Config, target: str):
        from dmf_core.data.loading.loader import build_test_loader

        img = cfg.model.image
        self.paths = {s: paths.lmdb_path(target, s) for s in ("query", "gallery")}
        self.loaders = {
            s: build_test_loader(p, cfg.augment, img.height, img.width, cfg.evaluate.batch_size,
                                 cfg.train.num_workers, expected_meta=expected_lmdb_meta(cfg))
            for s, p in self.paths.items()
        }
        self.sidecars = {s: loader.dataset.sidecar for s, loader in self.loaders.items()}

    def ids(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        side = self.sidecars[split]
        return side["pid"].to_numpy(), side["camid"].to_numpy()

    def image(self, split: str, index: int):
        from dmf_core.data.images import decode_rgb

        return decode_rgb(self.loaders[split].dataset.reader.get_bytes(index), "stored image")


def _features(model, splits: TargetSplits, flip: bool) -> dict[str, np.ndarray]:
    from dmf_core.eval.features import extract_features

    model.eval()
    return {s: extract_features(model.embed_images, loader, flip=flip)
            for s, loader in splits.loaders.items()}


def _rank(cfg: Config, feats: dict[str, np.ndarray], splits: TargetSplits):
    from dmf_core.eval.ranking import evaluate_features, evaluate_rank

    q_pids, q_cams = splits.ids("query")
    g_pids, g_cams = splits.ids("gallery")
    if cfg.evaluate.rerank:
        from dmf_core.eval.rerank import rerank_from_features

        dist = rerank_from_features(feats["query"], feats["gallery"])
        return evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=cfg.evaluate.max_rank), dist
    result = evaluate_features(feats["query"], feats["gallery"], q_pids, g_pids, q_cams, g_cams,
                               max_rank=cfg.evaluate.max_rank)
    return result, None


def evaluate_cell(cfg: Config, row: str, target: str) -> dict:
    """Evaluate the model of matrix row ``row`` (``models/<row>``: ``pretrain`` or a fine-tuning
    source) on <target>; write the cell record (returned), its run facts, the CMC TSV
    and the ranked list.

    The record (``reports/eval/<row>__<target>.json``) holds only what the inputs decide: the
    five numbers, the counts and, in the ``pretrain`` row, the untrained reference. Versions and
    timings go to the run facts (``reports/facts/evaluate/<row>__<target>.json``)."""
    from dmf_core.eval.matrix import write_cmc_tsv
    from dmf_core.model.build import DMFModel

    started = time.perf_counter()
    torch.set_num_threads(cfg.train.threads)
    splits = TargetSplits(cfg, target)
    model, _ = DMFModel.from_pretrained(paths.row_model_dir(row))
    feats = _features(model, splits, cfg.evaluate.flip)
    result, _ = _rank(cfg, feats, splits)

    untrained = _untrained_reference(cfg, splits) if row == paths.PRETRAIN_ROW else None
    q_pids, _ = splits.ids("query")
    g_pids, _ = splits.ids("gallery")
    record = result.summary()  # the five numbers of a cell that DVC diffs
    if untrained is not None:
        record["untrained"] = untrained
        record["untrained_init"] = (f"the model.image.pretrained weights ({Path(cfg.model.image.pretrained).name})"
                                    if cfg.model.image.pretrained else "random weights")
    record.update(num_query=int(len(q_pids)), num_gallery=int(len(g_pids)),
                  num_valid_query=int(result.num_valid))

    write_record(paths.eval_json(row, target), record)
    cmc_path = paths.cmc_tsv(row, target)
    cmc_path.parent.mkdir(parents=True, exist_ok=True)
    write_cmc_tsv(result.cmc, cmc_path)
    if cfg.evaluate.ranked_list_queries:
        _ranked_list(cfg, feats, splits, paths.ranked_list_png(row, target), model)
    write_record(paths.eval_facts_json(row, target), {
        "source": row, "target": target, "seed": cfg.seed, "rerank": cfg.evaluate.rerank,
        "flip": cfg.evaluate.flip, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "wall_s": round(time.perf_counter() - started, 1)})
    log.info("%s -> %s: rank-1 %.1f mAP %.1f", row, target, record["rank1"], record["mAP"])
    return record


def _untrained_reference(cfg: Config, splits: TargetSplits) -> dict:
    """The five numbers of the same architecture at its initialisation (seeded random weights,
    or model.image.pretrained where that is set) on this target. It is one model for every row
    of the matrix (one class: the classifier's size would move the random draws of the
    projection), so only the ``pretrain`` row's cell computes it and the report shares it."""
    from dmf_core.model.build import build_model

    torch.manual_seed(cfg.seed)
    untrained = build_model(cfg, num_classes=1, with_text=False)
    return _rank(cfg, _features(untrained, splits, cfg.evaluate.flip), splits)[0].summary()


def _ranked_list(cfg: Config, feats: dict[str, np.ndarray], splits: TargetSplits, out_png: Path,
                 model) -> None:
    """The ranked-list PNG; with ``evaluate.ranked_list_maps`` each row's images with their maps
    (dmf_core/eval/explain.py, the default method) under it."""
    from dmf_core.eval.visualise import ranked_list_for_queries

    load_map = None
    if cfg.evaluate.ranked_list_maps:
        from dmf_core.eval.explain import map_loader

        # The images as the features saw them: the split's test transform, normalised.
        load_map = map_loader(model, lambda split, i: splits.loaders[split].dataset[i]["image"], splits.image)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    q_pids, q_cams = splits.ids("query")
    g_pids, g_cams = splits.ids("gallery")
    ranked_list_for_queries(feats["query"], feats["gallery"], q_pids, g_pids, q_cams, g_cams,
                            load_image=splits.image, num_queries=cfg.evaluate.ranked_list_queries,
                            seed=cfg.seed, out_png=out_png, load_map=load_map)
