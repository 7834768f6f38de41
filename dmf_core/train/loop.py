"""One training loop for Stage I (``pretrain``) and Stage II (``finetune``).

``run_stage`` is what the DVC stages call (under torchrun): it reads the packed LMDB, builds the
P x K loader and calls :func:`train`, which any in-memory loader of the same dict batches can
drive too (tests, benchmarks).

Per epoch: loader moved to the epoch (sampler order, caption choice), all RNGs reseeded from
(seed, epoch, rank), losses summed on the device (one host sync per ``SYNC_EVERY`` steps for the
non-finite guard), and at the end of the epoch the curve row, the tracking scalars and -- every
``train.checkpoint_every`` epochs -- the resumable state ``work_dir/last.pt``. A re-run resumes
from that state when it was written with the same training params; the result is then identical
to an uninterrupted run (exactly so with ``train.num_workers: 0``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm import tqdm

from dmf_core.config import Config, StageTrainConfig, to_dict
from dmf_core.runtime import StageError
from dmf_core.track import Tracker, write_metrics, write_tsv
from dmf_core.train import checkpoint as ckpt
from dmf_core.train.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    broadcast_buffers,
    cleanup,
    init_distributed,
    seed_everything,
)
from dmf_core.train.losses import dmf_losses
from dmf_core.train.schedule import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

Stage = Literal["pretrain", "finetune"]
LOSS_NAMES = ("loss", "id_loss", "triplet_loss", "align_loss")
CURVE_COLUMNS = ["epoch", *LOSS_NAMES, "lr"]
SYNC_EVERY = 50  # steps between non-finite checks inside an epoch (each is one host sync)


class NonFiniteLossError(StageError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class StageData:
    """What the loop needs from the data side.

    ``loader`` yields dicts with ``image`` (B,3,H,W float), ``label`` (B,) and, with captions,
    ``caption`` (list of B str); ``set_epoch(epoch)`` moves sampler order and caption choice;
    ``sampler`` (optional) provides ``state_dict()`` for the checkpoint.
    """

    loader: Iterable[dict]
    num_classes: int
    num_images: int
    set_epoch: Any = None
    sampler: Any = None
    captions: list[str] | None = None  # every caption of the set, to precompute token states
    info: dict = field(default_factory=dict)


def stage_config(cfg: Config, stage: Stage) -> StageTrainConfig:
    if stage not in ("pretrain", "finetune"):
        raise ValueError(f"stage: expected 'pretrain' or 'finetune', got {stage!r}")
    return cfg.pretrain if stage == "pretrain" else cfg.finetune


def uses_captions(cfg: Config, stage: Stage) -> bool:
    return stage == "pretrain" and cfg.fusion.mode == "shared"


def training_fingerprint(cfg: Config, stage: Stage, data: StageData, world_size: int) -> str:
    """What a checkpoint must agree on to be resumed: every param that changes the trajectory."""
    d = to_dict(cfg)
    st = dict(d[stage])
    st.pop("sources", None)
    train = dict(d["train"])
    for k in ("checkpoint_every", "nproc"):
        train.pop(k, None)
    return ckpt.params_hash({
        "stage": stage, "seed": d["seed"], "model": d["model"], "fusion": d["fusion"], "loss": d["loss"],
        "augment": d["augment"], "train": train, "stage_cfg": st, "num_classes": data.num_classes,
        "num_images": data.num_images, "world_size": world_size, "info": data.info,
    })


def resolve_precision(cfg: Config, device: torch.device) -> str:
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return p


def cpu_threads(cfg: Config, dist: DistInfo) -> int:
    """``train.threads`` is per machine: CPU ranks on one machine share it."""
    if dist.device.type == "cuda":
        return cfg.train.threads
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cfg.train.threads // max(local, 1))


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % 2**31


# ---------------------------------------------------------------------------------------------
# Data from the packed LMDB
# ---------------------------------------------------------------------------------------------


def build_stage_data(cfg: Config, stage: Stage, train_lmdb: Path, captions_parquet: Path | None,
                     dist: DistInfo) -> StageData:
    from dmf_core.data.loader import CaptionPicker, build_train_loader, set_epoch

    st = stage_config(cfg, stage)
    picker = None
    if uses_captions(cfg, stage):
        if captions_parquet is None:
            raise ValueError("fusion.mode=shared: pretraining needs the captions parquet (captions_parquet=None)")
        picker = CaptionPicker(Path(captions_parquet), seed=cfg.seed)
    img = cfg.model.image
    loader = build_train_loader(
        Path(train_lmdb), cfg.augment, img.height, img.width, st.P, st.K, cfg.seed,
        num_workers=cfg.train.num_workers, rank=dist.rank, world_size=dist.world_size,
        captions=picker, pin_memory=dist.device.type == "cuda",
    )
    dataset = loader.dataset
    captions = [picker.text(i) for i in range(len(picker))] if picker is not None else None
    return StageData(
        loader=loader, num_classes=dataset.num_classes, num_images=len(dataset),
        set_epoch=lambda epoch: set_epoch(loader, epoch), sampler=loader.batch_sampler,
        captions=captions, info={"lmdb": str(train_lmdb), "captions": str(captions_parquet or "")},
    )


def run_stage(
    cfg: Config,
    stage: Stage,
    *,
    train_lmdb: Path,
    out_dir: Path,
    metrics_path: Path,
    curve_path: Path,
    work_dir: Path,
    init_from: Path | None = None,
    captions_parquet: Path | None = None,
) -> dict:
    """Train one stage from the packed LMDB and write its outputs (rank 0); returns the metrics."""
    dist = init_distributed()
    try:
        data = build_stage_data(cfg, stage, Path(train_lmdb), captions_parquet, dist)
        return train(cfg, stage, data, out_dir=Path(out_dir), metrics_path=Path(metrics_path),
                     curve_path=Path(curve_path), work_dir=Path(work_dir), init_from=init_from, dist=dist)
    finally:
        cleanup()


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def compiled_forward(model: nn.Module, mode: str | None, device: torch.device) -> nn.Module:
    """``model`` under ``torch.compile(mode=...)``; checkpoints keep saving the plain module.

    ``reduce-overhead`` (CUDA graphs) only pays on CUDA, where small batches are launch-bound;
    elsewhere it stays eager rather than spend minutes compiling for no gain.
    """
    if mode is None or (mode == "reduce-overhead" and device.type != "cuda"):
        return model
    return torch.compile(model, mode=mode)


def _all_finite(model: nn.Module) -> bool:
    flags = [p.detach().isfinite().all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def train(
    cfg: Config,
    stage: Stage,
    data: StageData,
    *,
    out_dir: Path,
    metrics_path: Path,
    curve_path: Path,
    work_dir: Path,
    init_from: Path | None = None,
    dist: DistInfo | None = None,
    on_end: Callable[[nn.Module], None] | None = None,
) -> dict:
    """Train ``stage`` on ``data``; rank 0 writes model, meta, metrics and curve. Returns the metrics.

    ``on_end(model)`` is called on every rank with the trained (unwrapped) model (tests, benchmarks).
    """
    started = time.perf_counter()
    dist = dist or init_distributed()
    torch.set_num_threads(cpu_threads(cfg, dist))
    device = dist.device
    st = stage_config(cfg, stage)
    with_text = uses_captions(cfg, stage)
    precision = resolve_precision(cfg, device)
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Model: identical initialisation on every rank (DDP also broadcasts rank 0's weights).
    from dmf_core.model.build import build_model

    seed_everything(cfg.seed)
    model = build_model(cfg, data.num_classes, with_text=with_text,
                        pretrained=stage == "pretrain" or init_from is None)
    if stage == "finetune" and init_from is not None:
        ckpt.load_init_weights(model, init_from)
    model.to(device)

    cache = None
    if with_text and cfg.model.text.freeze:
        from dmf_core.model.text import CaptionStateCache, TextEncoder

        encoder = TextEncoder(cfg.model.text.name, cfg.model.text.max_length, freeze=True).to(device)
        cache = CaptionStateCache(encoder)

    steps_per_epoch = len(data.loader) // st.accumulate
    if steps_per_epoch == 0:
        raise ValueError(f"{stage}: {len(data.loader)} batches per epoch, fewer than {stage}.accumulate="
                         f"{st.accumulate}; lower P/K or accumulate")
    optimizer = build_optimizer(model, st)
    scheduler = build_scheduler(optimizer, st, steps_per_epoch)

    # Resume.
    fingerprint = training_fingerprint(cfg, stage, data, dist.world_size)
    start_epoch, curve, totals = 0, [], {"images": 0, "train_s": 0.0}
    state = ckpt.load_training_state(work_dir)
    if state is not None and state.get("fingerprint") != fingerprint:
        log.warning("%s: written with other training params; starting from scratch", work_dir / ckpt.STATE_FILE)
        state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, curve, totals = state["epoch"], list(state["curve"]), dict(state["totals"])
        log.info("resuming %s from %s at epoch %d/%d", stage, work_dir / ckpt.STATE_FILE, start_epoch, st.epochs)

    ddp_model: nn.Module = model
    if dist.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    forward = compiled_forward(ddp_model, cfg.train.compile, device)

    tracker = Tracker(cfg.tracking.clearml, cfg.tracking.project, f"{stage}", enabled=dist.is_main,
                      config=to_dict(cfg), tags=[stage])
    if cache is not None and data.captions and start_epoch < st.epochs:
        t0 = time.perf_counter()
        cache.warm(data.captions, progress=dist.is_main)
        log.info("caption token states: %d distinct captions in %.1f s", len(cache), time.perf_counter() - t0)

    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    batch_size = None
    for epoch in range(start_epoch, st.epochs):
        seed_everything(epoch_seed(cfg.seed, epoch, dist.rank))
        if data.set_epoch is not None:
            data.set_epoch(epoch)
        ddp_model.train()
        sums = torch.zeros(len(LOSS_NAMES), device=device)
        n_batches, n_images = 0, 0
        epoch_t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        bar = tqdm(data.loader, desc=f"{stage} {epoch + 1}/{st.epochs}", leave=False,
                   disable=None if dist.is_main else True)
        for i, batch in enumerate(bar):
            if i >= steps_per_epoch * st.accumulate:
                break  # an incomplete accumulation group at the end is dropped
            images = batch["image"].to(device, non_blocking=True)
            labels = torch.as_tensor(batch["label"]).to(device, non_blocking=True)
            kwargs = {}
            if with_text:
                if cache is not None:
                    kwargs["text_states"], kwargs["text_mask"] = cache.encode(batch["caption"], device)
                else:
                    kwargs["captions"] = batch["caption"]
            sync_now = (i + 1) % st.accumulate == 0
            no_sync = ddp_model.no_sync() if dist.distributed and not sync_now else contextlib.nullcontext()
            with no_sync:
                with autocast:
                    out = forward(images, **kwargs)
                    losses = dmf_losses(out, labels, cfg)
                (losses["loss"] / st.accumulate).backward()
            if sync_now:
                if st.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), st.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            sums += torch.stack([losses[k].detach().float() for k in LOSS_NAMES])
            n_batches += 1
            n_images += len(images)
            batch_size = batch_size or len(images)
            # Single process: stop early on a non-finite loss. Under DDP every rank must run the
            # same number of steps, so the (all-reduced) check at the end of the epoch decides.
            if not dist.distributed and n_batches % SYNC_EVERY == 0 and not bool(sums.isfinite().all()):
                break
        bar.close()
        broadcast_buffers(model)
        epoch_s = time.perf_counter() - epoch_t0
        means = all_reduce_mean(sums / max(n_batches, 1)).tolist()
        if not all(math.isfinite(v) for v in means) or not _all_finite(model):
            tracker.close()
            bad = ", ".join(f"{k}={v:.4g}" for k, v in zip(LOSS_NAMES, means))
            raise NonFiniteLossError(
                f"{stage}: non-finite loss in epoch {epoch + 1} ({bad}); the last good checkpoint "
                f"{work_dir / ckpt.STATE_FILE} is kept (epoch {start_epoch if not curve else curve[-1]['epoch']}). "
                f"Lower {stage}.lr, set {stage}.grad_clip or check the data"
            )
        totals["images"] += n_images * dist.world_size
        totals["train_s"] += epoch_s
        row = {"epoch": epoch + 1, **dict(zip(LOSS_NAMES, means)), "lr": optimizer.param_groups[0]["lr"]}
        curve.append(row)
        log.info("%s epoch %d/%d: %s lr=%.3g %.0f img/s", stage, epoch + 1, st.epochs,
                 " ".join(f"{k}={v:.4f}" for k, v in zip(LOSS_NAMES, means)), row["lr"],
                 n_images * dist.world_size / max(epoch_s, 1e-9))
        if dist.is_main:
            write_tsv(curve_path, curve, CURVE_COLUMNS)
            tracker.scalars("loss", {k: row[k] for k in LOSS_NAMES}, epoch + 1)
            tracker.scalar("lr", "lr", row["lr"], epoch + 1)
            last = epoch + 1 == st.epochs
            if last or (epoch + 1) % cfg.train.checkpoint_every == 0:
                ckpt.save_training_state(work_dir, {
                    "fingerprint": fingerprint, "epoch": epoch + 1, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "sampler": data.sampler.state_dict() if hasattr(data.sampler, "state_dict") else {},
                    "rng": ckpt.rng_state(), "curve": curve, "totals": totals,
                })
        barrier()

    # Outputs (rank 0).
    final = curve[-1] if curve else {k: float("nan") for k in LOSS_NAMES}
    per_rank_batch = batch_size or (stage_config(cfg, stage).P * stage_config(cfg, stage).K)
    metrics = {
        "stage": stage,
        "epochs": st.epochs,
        **{k: final[k] for k in LOSS_NAMES},
        "images_per_s": totals["images"] / totals["train_s"] if totals["train_s"] > 0 else None,
        "num_classes": data.num_classes,
        "num_images": data.num_images,
        "run": {
            "seed": cfg.seed,
            "world_size": dist.world_size,
            "effective_batch": per_rank_batch * dist.world_size * st.accumulate,
            "precision": precision,
            "device": str(device.type),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "with_captions": with_text,
            "train_s": round(totals["train_s"], 2),
            "wall_s": round(time.perf_counter() - started, 2),
            "resumed_from_epoch": start_epoch,
        },
    }
    if tracker.active:
        metrics["run"]["clearml_task"] = str(tracker.task.id)
    if dist.is_main:
        ckpt.save_model(model, out_dir, cfg=cfg, num_classes=data.num_classes, stage=stage,
                        extra={"epochs": st.epochs, "init_from": str(init_from) if init_from else None})
        write_tsv(curve_path, curve, CURVE_COLUMNS)
        write_metrics(metrics_path, metrics)
        tracker.single_values({k: metrics[k] for k in (*LOSS_NAMES, "images_per_s")})
    tracker.close()
    if on_end is not None:
        on_end(model)
    barrier()
    return metrics
