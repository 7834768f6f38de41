"""One training loop for Stage I (``pretrain``) and Stage II (``finetune``).

``train_stage`` is what the DVC stages call (one process, or under torchrun): it reads the packed
LMDB, builds the P x K loader and calls :func:`train`, which any in-memory loader of the same
dict batches can drive too (tests, benchmarks).

Per epoch: loader moved to the epoch (sampler order, caption choice), all RNGs reseeded from
(seed, epoch, rank), losses summed on the device (one host sync per ``SYNC_EVERY`` steps for the
non-finite guard), and at the end of the epoch the curve row, the tracking scalars and -- every
``train.checkpoint_every`` epochs -- the resumable state ``work_dir/last.pt``. A re-run resumes
from that state only when its fingerprint (params, upstream params, content of the inputs, code:
:mod:`dmf_core.train.fingerprint`) is the same; the result is then identical to an uninterrupted
run (exactly so with ``train.num_workers: 0``). A finished run deletes its state.

``train`` reads top to bottom: :func:`setup`, :func:`resume`, :func:`train_one_epoch` +
:func:`end_epoch` per epoch, :func:`finalise`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dmf_core.config import Config, StageTrainConfig, to_dict
from dmf_core.model.pretrained import load_init_weights, unwrap
from dmf_core.runtime import StageError
from dmf_core.track import Tracker, write_metrics, write_tsv
from dmf_core.train import checkpoint as ckpt
from dmf_core.train.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    broadcast_buffers,
    broadcast_object,
    cleanup,
    init_distributed,
    rank_threads,
    seed_everything,
    set_rank_settings,
)
from dmf_core.train.ema import WeightAverage
from dmf_core.train.losses import STATS, TERMS
from dmf_core.train.precision import cpu_bf16_flags, resolve_precision
from dmf_core.train.schedule import build_optimizer, build_scheduler
from dmf_core.train.step import CAPTION_PAD_MULTIPLE, compiles, loss_step
from dmf_core.train.teacher import reads_text, teacher_spec, teacher_texts, teacher_vectors, uses_teacher

log = logging.getLogger(__name__)

Stage = Literal["pretrain", "finetune"]
LOSS_NAMES = ("loss", *TERMS)
CURVE_VALUES = (*LOSS_NAMES, *STATS)  # per epoch, averaged over the batches and ranks
CURVE_COLUMNS = ["epoch", *CURVE_VALUES, "lr"]
SYNC_EVERY = 50  # steps between non-finite checks inside an epoch (each is one host sync)
# Feature-health images per forward pass: fixed, so that evaluate.batch_size never re-trains.
HEALTH_BATCH = 128


class NonFiniteLossError(StageError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class StageData:
    """What the loop needs from the data side.

    ``loader`` yields dicts with ``image`` (B,3,H,W float), ``label`` (B,) and, with captions,
    ``caption`` (list of B str); ``set_epoch(epoch)`` moves sampler order and caption choice.
    ``datasets`` names the datasets it was built from and ``inputs`` holds content digests of
    what it read (LMDB, captions): both go into the resume fingerprint. ``attribute_table``
    (num_classes, 13) holds the attribute targets (of the attribute-head control, or of the phrase
    teacher). ``health`` loads images the
    stage does not train on (test transforms) for :mod:`dmf_core.train.health`, with one caption
    per image in ``health_captions`` when the stage reads captions.
    """

    loader: Iterable[dict]
    num_classes: int
    num_images: int
    set_epoch: Any = None
    captions: list[str] | None = None  # every caption of the set, to precompute token states
    datasets: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    attribute_table: Any = None
    health: Iterable[dict] | None = None
    health_captions: list[str] | None = None
    batch_augment: Any = None  # train.decode=device: batch of bytes + augment draws -> images on the device
    caption_states: Path | None = None  # the encode_captions stage's output (None: encode the captions)
    teacher_texts: list[list[str]] | None = None  # per teacher vector, the texts it is the mean embedding of


def stage_config(cfg: Config, stage: Stage) -> StageTrainConfig:
    if stage not in ("pretrain", "finetune"):
        raise ValueError(f"stage: expected 'pretrain' or 'finetune', got {stage!r}")
    return cfg.pretrain if stage == "pretrain" else cfg.finetune


def uses_captions(cfg: Config, stage: Stage) -> bool:
    return stage == "pretrain" and cfg.fusion.mode == "shared"


def has_attribute_head(cfg: Config, stage: Stage) -> bool:
    """Whether the model has the 13-attribute head: the control's, or beside another mode's head."""
    return stage == "pretrain" and (cfg.fusion.mode == "attributes" or cfg.fusion.attribute_head)


def uses_attributes(cfg: Config, stage: Stage) -> bool:
    """Whether the batches carry attribute targets: the attribute head's, or the phrase teacher's."""
    return has_attribute_head(cfg, stage) or (stage == "pretrain" and cfg.fusion.mode == "phrases")


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % 2**31


# ---------------------------------------------------------------------------------------------
# Data from the packed LMDB
# ---------------------------------------------------------------------------------------------


def build_stage_data(cfg: Config, stage: Stage, captions_parquet: Path | None, dist: DistInfo, *,
                     train_lmdb: Path | None = None, training_set: Callable | None = None) -> StageData:
    """Pretraining reads ``train_lmdb``; fine-tuning calls ``training_set(rank, world_size,
    pin_memory)``, which returns what the row trains on (a
    :class:`~dmf_core.data.loading.union.RowTraining`: loader, content digests, datasets and the
    images it does not train on)."""
    from dmf_core.data.loading.loader import CaptionPicker

    if (train_lmdb is None) == (training_set is None) or (training_set is None) != (stage == "pretrain"):
        raise ValueError("build_stage_data: pretraining takes train_lmdb, fine-tuning training_set")
    if stage == "finetune":
        row = training_set(dist.rank, dist.world_size, dist.device.type == "cuda")
        data = _stage_data(cfg, row.loader, 0, dist)
        data.health = _health_loader(row.health)
        data.inputs.update(row.inputs)
        data.datasets = [cfg.pretrain.dataset, *row.datasets]
        return data
    picker = None
    if uses_captions(cfg, stage) or uses_attributes(cfg, stage) or uses_teacher(cfg, stage):
        if captions_parquet is None:
            raise ValueError(f"fusion.mode={cfg.fusion.mode}: pretraining needs the captions parquet "
                             "(captions_parquet=None)")
        picker = CaptionPicker(Path(captions_parquet), seed=cfg.seed)
    data = _stage_data(cfg, _pretrain_loader(cfg, dist, picker, train_lmdb), cfg.pretrain.holdout_ids, dist)
    dataset = data.loader.dataset
    data.health, held_out = _held_out_images(cfg, dataset, cfg.pretrain.holdout_ids)
    _add_caption_data(cfg, data, dataset, picker, held_out)
    if dist.is_main:
        from dmf_core.data.store.lmdb_store import content_digest
        from dmf_core.train.digest import file_sha256

        if picker is not None:
            data.inputs["captions"] = file_sha256(captions_parquet)
        data.inputs["train_lmdb"] = content_digest(train_lmdb)
    data.datasets = [cfg.pretrain.dataset]
    return data


def _stage_data(cfg: Config, loader, holdout: int, dist: DistInfo) -> StageData:
    from dmf_core.data.loading.loader import set_epoch

    dataset = loader.dataset
    data = StageData(loader=loader, num_classes=dataset.num_classes - holdout, num_images=len(dataset),
                     set_epoch=lambda epoch: set_epoch(loader, epoch))
    if cfg.train.decode == "device":
        from dmf_core.data.loading.device_augment import BatchAugment

        img = cfg.model.image
        data.batch_augment = BatchAugment(img.height, img.width, cfg.augment, dist.device,
                                          name_of=dataset.image_name)
    return data


def _pretrain_loader(cfg: Config, dist: DistInfo, picker, train_lmdb: Path):
    from dmf_core.data.loading.loader import build_train_loader

    st, img = cfg.pretrain, cfg.model.image
    return build_train_loader(Path(train_lmdb), cfg.augment, img.height, img.width, st.P, st.K, cfg.seed,
                              captions=picker, holdout_ids=cfg.pretrain.holdout_ids,
                              num_workers=cfg.train.num_workers, rank=dist.rank, world_size=dist.world_size,
                              pin_memory=dist.device.type == "cuda", encoded=cfg.train.decode == "device")


def _add_caption_data(cfg: Config, data: StageData, dataset, picker, held_out: list[int]) -> None:
    """What pretraining reads of the captions: the attribute targets, the teacher's texts, or the
    captions themselves."""
    if uses_teacher(cfg, "pretrain"):
        data.teacher_texts = teacher_texts(cfg, dataset, picker, data.num_classes)
        if reads_text(cfg, "pretrain") and cfg.fusion.mode == "prototypes":
            # every caption, as the encode_captions stage stored them (its key is this set)
            data.captions = [picker.text(i) for i in range(len(picker))]
    if uses_attributes(cfg, "pretrain"):
        from dmf_core.data.captions.controls import attribute_targets

        data.attribute_table = attribute_targets(dataset, picker)
    if uses_captions(cfg, "pretrain"):
        data.health_captions = [picker.text(dataset.caption_rows(i)[0]) for i in held_out]
        if cfg.fusion.captions == "shuffled":
            from dmf_core.data.captions.controls import shuffled_caption_sources

            dataset.take_captions_of(shuffled_caption_sources(dataset.labels, cfg.seed))
        data.captions = [picker.text(i) for i in range(len(picker))]


def _held_out_images(cfg: Config, dataset, holdout: int) -> tuple[Iterable[dict] | None, list[int]]:
    """Pretraining's held-out identities (test transforms), their loader and indices."""
    from torch.utils.data import Subset

    from dmf_core.data.loading.loader import ReidImageDataset, build_test_transform
    from dmf_core.train.health import spread_subset

    if not holdout:
        return None, []
    transform = build_test_transform(cfg.model.image.height, cfg.model.image.width, cfg.augment)
    candidates = np.flatnonzero(dataset.labels >= dataset.num_classes - holdout)
    held_out = candidates[spread_subset(len(candidates))].tolist()
    return _health_loader(Subset(ReidImageDataset(dataset.path, transform), held_out), spread=False), held_out


def _health_loader(images, spread: bool = True) -> Iterable[dict] | None:
    """Feature-health batches of ``images`` (a spread-out subset of them, unless already chosen)."""
    from torch.utils.data import DataLoader, Subset

    from dmf_core.train.health import spread_subset

    if images is None or len(images) == 0:
        return None
    if spread:
        images = Subset(images, spread_subset(len(images)).tolist())
    return DataLoader(images, batch_size=HEALTH_BATCH, shuffle=False)


def train_stage(
    cfg: Config,
    stage: Stage,
    *,
    out_dir: Path,
    metrics_path: Path,
    curve_path: Path,
    work_dir: Path,
    train_lmdb: Path | None = None,
    training_set: Callable | None = None,
    facts_path: Path | None = None,
    init_from: Path | None = None,
    captions_parquet: Path | None = None,
    caption_states: Path | None = None,
) -> dict:
    """Train one stage and write its outputs (rank 0); returns the record :func:`train` returns.
    Pretraining reads ``train_lmdb``, fine-tuning what ``training_set`` builds per rank
    (:func:`build_stage_data`; the row's datasets' params and content enter the resume
    fingerprint); ``caption_states`` is the folder the ``encode_captions`` stage wrote."""
    dist = init_distributed()
    try:
        data = build_stage_data(cfg, stage, captions_parquet, dist, train_lmdb=train_lmdb,
                                training_set=training_set)
        data.caption_states = Path(caption_states) if caption_states is not None else None
        return train(cfg, stage, data, out_dir=Path(out_dir), metrics_path=Path(metrics_path),
                     curve_path=Path(curve_path), work_dir=Path(work_dir), facts_path=facts_path,
                     init_from=init_from, dist=dist)
    finally:
        cleanup()


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _all_finite(model: nn.Module) -> bool:
    flags = [p.detach().isfinite().all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


@dataclass
class Run:
    """Everything one training run holds between its phases."""

    cfg: Config
    stage: Stage
    st: StageTrainConfig
    data: StageData
    dist: DistInfo
    work_dir: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps_per_epoch: int
    precision: str
    with_text: bool
    fingerprint: str | None = None  # rank 0 only: the others never read or write the state
    cache: Any = None
    start_epoch: int = 0
    curve: list = field(default_factory=list)
    totals: dict = field(default_factory=lambda: {"images": 0, "train_s": 0.0})
    batch_size: int | None = None
    ema: WeightAverage | None = None  # <stage>.ema > 0: the average of the weights, what is saved

    @property
    def result(self) -> nn.Module:
        """The model the stage hands on: the weight average when there is one."""
        return self.ema.shadow if self.ema is not None else self.model


def setup(cfg: Config, stage: Stage, data: StageData, work_dir: Path, init_from: Path | None,
          dist: DistInfo) -> Run:
    """Model (identical on every rank), optimizer, schedule and, on rank 0, the fingerprint."""
    from dmf_core.model.build import build_model
    from dmf_core.train.fingerprint import model_input_digests, training_fingerprint

    set_rank_settings(rank_threads(cfg.train.threads, dist.device), dist.device)
    st = stage_config(cfg, stage)
    with_text = uses_captions(cfg, stage)
    seed_everything(cfg.seed)
    attribute_classes, teacher = None, None
    if has_attribute_head(cfg, stage):
        from dmf_core.data.captions.controls import ATTRIBUTE_CLASSES as attribute_classes
    if uses_teacher(cfg, stage):
        from dmf_core.model.text import text_hidden_size

        teacher = teacher_spec(cfg, data.num_classes, text_hidden_size(cfg.model.text.name))
    model = build_model(cfg, data.num_classes, with_text=with_text,
                        pretrained=stage == "pretrain" or init_from is None, attribute_classes=attribute_classes,
                        teacher=teacher)
    if stage == "finetune" and init_from is not None:
        load_init_weights(model, init_from)
    model.to(dist.device)
    steps_per_epoch = len(data.loader) // st.accumulate
    if steps_per_epoch == 0:
        raise ValueError(f"{stage}: {len(data.loader)} batches per epoch, fewer than {stage}.accumulate="
                         f"{st.accumulate}; lower P/K or accumulate")
    optimizer = build_optimizer(model, st)
    run = Run(cfg=cfg, stage=stage, st=st, data=data, dist=dist, work_dir=Path(work_dir), model=model,
              optimizer=optimizer, scheduler=build_scheduler(optimizer, st, steps_per_epoch),
              steps_per_epoch=steps_per_epoch, precision=resolve_precision(cfg.train.precision, dist.device),
              with_text=with_text)
    if dist.is_main:
        inputs = {**data.inputs, **model_input_digests(cfg, init_from=init_from,
                                                       with_text=with_text or reads_text(cfg, stage))}
        run.fingerprint = training_fingerprint(
            cfg, stage, datasets=data.datasets, inputs=inputs, num_classes=data.num_classes,
            num_images=data.num_images, world_size=dist.world_size)
    if (with_text and cfg.model.text.freeze) or reads_text(cfg, stage):
        from dmf_core.model.text import CaptionStateCache, TextEncoder

        def encoder() -> TextEncoder:  # built only when a caption is not in the on-disk cache
            return TextEncoder(cfg.model.text.name, cfg.model.text.max_length, freeze=True).to(dist.device)

        run.cache = CaptionStateCache(encoder)
    if reads_text(cfg, stage):  # the teacher's vectors, before the weight average copies the model
        if data.captions:
            warm_caption_states(run, data.captions)
        model.teacher_head.set_vectors(teacher_vectors(run.cache, data.teacher_texts, dist.device))
        if not with_text:  # nothing reads a caption after this: free the states (GBs at paper scale)
            run.cache.release()
            data.captions = data.teacher_texts = None
    run.ema = WeightAverage(model, st.ema) if st.ema else None
    return run


def resume(run: Run) -> None:
    """Rank 0 decides: the saved state is resumed only when its fingerprint is this run's. The
    decision and the state itself are broadcast, so ranks on hosts without a shared filesystem
    start from the same epoch and weights (and none waits for a collective the others skip)."""
    path = run.work_dir / ckpt.STATE_FILE
    state = None
    if run.dist.is_main:
        state = ckpt.load_training_state(run.work_dir)
        if state is not None and state.get("fingerprint") != run.fingerprint:
            log.warning("%s: written by a run with other params, inputs or code; starting from scratch", path)
            state = None
    if run.dist.distributed:
        state = broadcast_object(state)
    if state is None:
        return
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    run.start_epoch, run.curve, run.totals = state["epoch"], list(state["curve"]), dict(state["totals"])
    log.info("resuming %s from %s at epoch %d/%d", run.stage, path, run.start_epoch, run.st.epochs)


def warm_caption_states(run: Run, captions: list[str]) -> None:
    """The frozen encoder's token states of every caption: read from the ``encode_captions``
    stage's output (``data.caption_states``, a DVC-cached output: experiments restore it instead
    of encoding) when it holds the states of these captions by this encoder on this kind of
    device, else encoded here, as that stage would have (:mod:`dmf_core.train.caption_states`).
    A caption the file lacks (beyond the cache's size bound) is encoded per batch."""
    from dmf_core.train.caption_states import caption_states_key, load_caption_states

    t0 = time.perf_counter()
    folder = run.data.caption_states
    loaded = None
    if folder is not None:
        loaded = load_caption_states(run.cache, folder, key=caption_states_key(run.cfg, captions),
                                     device=run.dist.device.type)
    if loaded is None:
        run.cache.warm(captions, progress=run.dist.is_main)
    else:
        log.info("caption token states: %d captions read from %s", loaded, folder)
    log.info("caption token states: %d distinct captions ready in %.1f s (%d encoded)", len(run.cache),
             time.perf_counter() - t0, run.cache.computed)


def _batch_inputs(run: Run, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    device = run.dist.device
    if run.data.batch_augment is not None:
        images = run.data.batch_augment(batch)
    else:
        images = batch["image"].to(device, non_blocking=True)
    labels = torch.as_tensor(batch["label"]).to(device, non_blocking=True)
    kwargs = {}
    if run.data.attribute_table is not None:
        kwargs["attributes"] = torch.as_tensor(run.data.attribute_table)[labels.cpu()].to(device)
    if run.with_text and run.cache is not None:
        pad = CAPTION_PAD_MULTIPLE if compiles(run.cfg.train.compile, device) else 1
        kwargs["text_states"], kwargs["text_mask"] = run.cache.encode(
            batch["caption"], device, pad_multiple=pad, max_length=run.cfg.model.text.max_length)
    elif run.with_text:
        kwargs["captions"] = batch["caption"]
    return images, labels, kwargs


def train_one_epoch(run: Run, epoch: int, ddp_model: nn.Module, step: nn.Module, autocast) -> dict:
    """One pass over the loader; returns the curve row (losses averaged over ranks, lr)."""
    st, dist = run.st, run.dist
    seed_everything(epoch_seed(run.cfg.seed, epoch, dist.rank))
    if run.data.set_epoch is not None:
        run.data.set_epoch(epoch)
    ddp_model.train()
    sums = torch.zeros(len(CURVE_VALUES), device=dist.device)
    n_batches, n_images = 0, 0
    epoch_t0 = time.perf_counter()
    run.optimizer.zero_grad(set_to_none=True)
    bar = tqdm(run.data.loader, desc=f"{run.stage} {epoch + 1}/{st.epochs}", leave=False,
               disable=None if dist.is_main else True)
    for i, batch in enumerate(bar):
        if i >= run.steps_per_epoch * st.accumulate:
            break  # an incomplete accumulation group at the end is dropped
        images, labels, kwargs = _batch_inputs(run, batch)
        attributes = kwargs.pop("attributes", None)
        sync_now = (i + 1) % st.accumulate == 0
        no_sync = ddp_model.no_sync() if dist.distributed and not sync_now else contextlib.nullcontext()
        with no_sync:
            with autocast:
                losses = step(images, labels, attributes, **kwargs)
            (losses["loss"] / st.accumulate).backward()
        if sync_now:
            if st.grad_clip:
                nn.utils.clip_grad_norm_(run.model.parameters(), st.grad_clip)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.scheduler.step()
            if run.ema is not None:
                run.ema.update(run.model)
        sums += torch.stack([losses[k].detach().float() for k in CURVE_VALUES])
        n_batches += 1
        n_images += len(images)
        run.batch_size = run.batch_size or len(images)
        # Single process: stop early on a non-finite loss. Under DDP every rank must run the
        # same number of steps, so the (all-reduced) check at the end of the epoch decides.
        if not dist.distributed and n_batches % SYNC_EVERY == 0 and not bool(sums.isfinite().all()):
            break
    bar.close()
    broadcast_buffers(run.model)
    epoch_s = time.perf_counter() - epoch_t0
    means = all_reduce_mean(sums / max(n_batches, 1)).tolist()
    if not all(math.isfinite(v) for v in means) or not _all_finite(run.model):
        bad = ", ".join(f"{k}={v:.4g}" for k, v in zip(CURVE_VALUES, means))
        kept = run.curve[-1]["epoch"] if run.curve else run.start_epoch
        raise NonFiniteLossError(
            f"{run.stage}: non-finite loss in epoch {epoch + 1} ({bad}); the last good checkpoint "
            f"{run.work_dir / ckpt.STATE_FILE} is kept (epoch {kept}). "
            f"Lower {run.stage}.lr, set {run.stage}.grad_clip or check the data")
    run.totals["images"] += n_images * dist.world_size
    run.totals["train_s"] += epoch_s
    row = {"epoch": epoch + 1, **dict(zip(CURVE_VALUES, means)), "lr": run.optimizer.param_groups[0]["lr"]}
    if dist.is_main:
        log.info("%s epoch %d/%d: %s lr=%.3g %.0f img/s", run.stage, epoch + 1, st.epochs,
                 " ".join(f"{k}={v:.4f}" for k, v in zip(CURVE_VALUES, means)), row["lr"],
                 n_images * dist.world_size / max(epoch_s, 1e-9))
    return row


def end_epoch(run: Run, row: dict, curve_path: Path, tracker: Tracker) -> None:
    """Rank 0: the curve so far, the tracking scalars and, when due, the resumable state."""
    run.curve.append(row)
    if not run.dist.is_main:
        return
    epoch = row["epoch"]
    write_tsv(curve_path, run.curve, CURVE_COLUMNS)
    tracker.scalars("loss", {k: row[k] for k in LOSS_NAMES}, epoch)
    tracker.scalar("lr", "lr", row["lr"], epoch)
    if epoch == run.st.epochs or epoch % run.cfg.train.checkpoint_every == 0:
        ckpt.save_training_state(run.work_dir, {
            "fingerprint": run.fingerprint, "epoch": epoch, "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "curve": run.curve, "totals": run.totals,
            **({"ema": run.ema.state_dict()} if run.ema is not None else {}),
        })


def stage_metrics(run: Run, started: float) -> dict:
    """The run's record: the final losses, the data statistics and, under ``run``, the run facts."""
    cfg, st, dist = run.cfg, run.st, run.dist
    final = run.curve[-1] if run.curve else {k: float("nan") for k in CURVE_VALUES}
    totals = run.totals
    return {
        "stage": run.stage,
        "epochs": st.epochs,
        **{k: final[k] for k in LOSS_NAMES},
        "health": {**{k: round(final[k], 4) for k in STATS}, **measure_health(run)},
        "images_per_s": totals["images"] / totals["train_s"] if totals["train_s"] > 0 else None,
        "num_classes": run.data.num_classes,
        "num_images": run.data.num_images,
        "run": {
            "seed": cfg.seed,
            "world_size": dist.world_size,
            "effective_batch": (run.batch_size or st.P * st.K) * dist.world_size * st.accumulate,
            "precision": run.precision,
            "cpu_bf16_flags": cpu_bf16_flags(),
            "device": str(dist.device.type),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "with_captions": run.with_text,
            "captions_encoded": run.cache.computed if run.cache is not None else 0,
            "train_s": round(totals["train_s"], 2),
            "wall_s": round(time.perf_counter() - started, 2),
            "resumed_from_epoch": run.start_epoch,
        },
    }


def measure_health(run: Run) -> dict:
    """Rank 0: feature health of the trained model on the images the stage did not train on
    (:mod:`dmf_core.train.health`); empty where there are none."""
    from dmf_core.train.health import cosine_statistics, embed, retrieval_map

    if not run.dist.is_main or run.data.health is None:
        return {}
    model, device = run.result, run.dist.device
    was_training = model.training
    model.eval()
    feats, pids = embed(model.embed_images, run.data.health, device)
    out = cosine_statistics(feats, pids)
    if run.data.health_captions and run.cache is not None:
        with torch.no_grad():
            states, mask = run.cache.encode(run.data.health_captions, device)
            text = model.embed_text_states(states, mask).float().cpu()
        out["caption_to_image_mAP"] = retrieval_map(text, pids, feats, pids, own_image_out=True)
    model.train(was_training)
    return out


def metric_names(run: Run) -> tuple[str, ...]:
    """What goes into the DVC metric: the final losses of the terms that took part, and the health."""
    unused = {"align_loss"} if not run.with_text else set()
    if unwrap(run.model).attribute_head is None:
        unused.add("attribute_loss")
    if unwrap(run.model).teacher_head is None:
        unused.add("teacher_loss")
    return (*(k for k in LOSS_NAMES if k not in unused), "health")


def finalise(run: Run, metrics: dict, tracker: Tracker, *, out_dir: Path, metrics_path: Path,
             curve_path: Path, facts_path: Path | None, init_from: Path | None) -> None:
    """Rank 0: model, curve, the DVC metric (final losses) and the run facts (everything else of
    the record: statistics, versions, timings, none of them for DVC to diff); then the training
    state goes, so that no later run (with other inputs, or after a code change DVC re-runs the
    stage for) can take it for done."""
    if not run.dist.is_main:
        return
    unwrap(run.result).save_pretrained(out_dir, cfg=run.cfg, num_classes=run.data.num_classes, stage=run.stage,
                                      extra={"epochs": run.st.epochs, "init_from": str(init_from) if init_from else None})
    write_tsv(curve_path, run.curve, CURVE_COLUMNS)
    write_metrics(metrics_path, {k: metrics[k] for k in metric_names(run)})
    if facts_path is not None:
        write_metrics(facts_path, {k: v for k, v in metrics.items() if k not in (*LOSS_NAMES, "health")})
    tracker.single_values({k: metrics[k] for k in (*LOSS_NAMES, "images_per_s")})
    ckpt.remove_training_state(run.work_dir)


def train(
    cfg: Config,
    stage: Stage,
    data: StageData,
    *,
    out_dir: Path,
    metrics_path: Path,
    curve_path: Path,
    work_dir: Path,
    facts_path: Path | None = None,
    init_from: Path | None = None,
    dist: DistInfo | None = None,
    on_end: Callable[[nn.Module], None] | None = None,
) -> dict:
    """Train ``stage`` on ``data``; rank 0 writes model, meta, curve, ``metrics_path`` (the final
    losses: a DVC metric) and, when given, ``facts_path`` (the rest of the record). Returns the
    whole record (:func:`stage_metrics`: losses, ``images_per_s``, counts, ``run`` facts).

    ``on_end(model)`` is called on every rank with the model the stage saves: the trained
    (unwrapped) model, or its weight average with ``<stage>.ema > 0`` (tests, benchmarks).
    """
    started = time.perf_counter()
    dist = dist or init_distributed()
    run = setup(cfg, stage, data, Path(work_dir), init_from, dist)
    resume(run)

    ddp_model: nn.Module = run.model
    if dist.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    step = loss_step(ddp_model, cfg, cfg.train.compile, dist.device, dist.distributed)
    autocast = (torch.autocast(dist.device.type, dtype=torch.bfloat16) if run.precision == "bf16"
                else contextlib.nullcontext())
    if run.with_text and run.cache is not None and data.captions and run.start_epoch < run.st.epochs:
        warm_caption_states(run, data.captions)

    tracker = Tracker(cfg.tracking.clearml, cfg.tracking.project, stage, enabled=dist.is_main,
                      config=to_dict(cfg), tags=[stage])
    try:
        for epoch in range(run.start_epoch, run.st.epochs):
            row = train_one_epoch(run, epoch, ddp_model, step, autocast)
            end_epoch(run, row, Path(curve_path), tracker)
            barrier()
        metrics = stage_metrics(run, started)
        if tracker.active:
            metrics["run"]["clearml_task"] = str(tracker.task.id)
        finalise(run, metrics, tracker, out_dir=Path(out_dir), metrics_path=Path(metrics_path),
                 curve_path=Path(curve_path), facts_path=Path(facts_path) if facts_path else None,
                 init_from=init_from)
    finally:
        tracker.close()
    if on_end is not None:
        on_end(run.result)
    barrier()
    return metrics
