"""Training throughput (images/s) of pretraining and fine-tuning steps, model compute and with the loader.

Model compute alone: random images (and, for pretraining with captions, random caption token
states of the text encoder's width: the frozen encoder's states are cached, so this is the
trainable work of a step). With the loader: a throwaway LMDB of random JPEGs (+ two captions
each) packed with the real packer, read through the real P x K loader; reports the loader on
its own and loader + step.

    python benchmarks/train_throughput.py                       # params.yaml (the demo), CPU
    python benchmarks/train_throughput.py --profile tiny        # seconds, for a smoke run
    python benchmarks/train_throughput.py --params configs/paper.yaml --device cuda --loader
    python benchmarks/train_throughput.py --params configs/paper.yaml --device cuda --loader --decode device
    python benchmarks/train_throughput.py --json out.json

Prints one JSON object: device, threads, precision, and per stage images/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from dmf_core.config import config_from_dict
from dmf_core.model.build import build_model
from dmf_core.train.schedule import build_optimizer
from dmf_core.train.step import LossStep, loss_step

CAPTION_TOKENS = 48  # a SynthPed/FineGPR caption batch's padded length (36 under MiniLM) in the
# compiled step's buckets of 16 (dmf_core.train.step.CAPTION_PAD_MULTIPLE)


def tiny(params: dict) -> dict:
    params["model"]["image"].update(depth=1, dim=32, heads=2, height=64, width=32, pretrained=None)
    params["fusion"].update(dim=32, layers=1, heads=2)
    for stage in ("pretrain", "finetune"):
        params[stage].update(P=4, K=4)
    return params


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_fn(cfg, stage: str, device: torch.device, precision: str, compile_mode: str | None, scope: str,
            text_dim=None, num_classes=None):
    """One optimizer step, as the training loop takes it: ``scope`` "step" compiles model and losses
    as one graph (:func:`dmf_core.train.step.loss_step`, what the loop does), "model" the model alone."""
    st = cfg.pretrain if stage == "pretrain" else cfg.finetune
    with_text = stage == "pretrain" and cfg.fusion.mode == "shared"
    num_classes = num_classes or max(st.P * 4, 64)
    model = build_model(cfg, num_classes, with_text=with_text, pretrained=False,
                        text_dim=text_dim).to(device).train()
    opt = build_optimizer(model, st)
    if scope == "step":
        losses_of = loss_step(model, cfg, compile_mode, device)
    else:
        fwd = torch.compile(model, mode=compile_mode) if compile_mode else model
        losses_of = LossStep(fwd, cfg)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    def step(images, labels, states=None, mask=None):
        inputs = {"text_states": states, "text_mask": mask} if states is not None else {}
        with autocast:
            loss = losses_of(images, labels, **inputs)["loss"]
        loss.backward()
        if st.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), st.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, model, with_text


def synthetic_inputs(cfg, stage, device, model, with_text):
    """Random images (and caption states of the text encoder's width), one batch of the stage."""
    st = cfg.pretrain if stage == "pretrain" else cfg.finetune
    b, img = st.P * st.K, cfg.model.image
    images = torch.randn(b, 3, img.height, img.width, device=device)
    labels = torch.arange(st.P, device=device).repeat_interleave(st.K)
    if not with_text:
        return images, labels, None, None
    states = torch.randn(b, CAPTION_TOKENS, model.text_proj.in_features, device=device)
    return images, labels, states, torch.ones(b, CAPTION_TOKENS, dtype=torch.bool, device=device)


def timed(device, fn, steps: int, warmup: int) -> float:
    """Images per second over ``steps`` calls of ``fn`` after ``warmup`` untimed ones; ``fn``
    returns how many images it handled."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    n = sum(fn() for _ in range(steps))
    _sync(device)
    return n / (time.perf_counter() - t0)


def profile_table(device, fn, steps: int, path: Path, by: str = "device") -> None:
    """torch.profiler over ``steps`` calls: the kernels and ops by device time (``by="device"``)
    or by host time including what they wait for (``by="host"``), to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    key = "self_device_time_total" if device.type == "cuda" and by == "device" else "cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70) + "\n")


def pack_random_lmdb(tmp: Path, ids: int, per_id: int, height: int, width: int) -> tuple[Path, Path]:
    import numpy as np
    import pandas as pd
    from PIL import Image

    from dmf_core.data.store.lmdb_store import pack_split

    rng = np.random.default_rng(0)
    root = tmp / "raw"
    rows, caps = [], []
    for pid in range(ids):
        for n in range(per_id):
            rel = f"{pid + 1:04d}/{pid + 1:04d}_c{n % 36 + 1:02d}_{n:04d}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            arr = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / rel, quality=90)
            rows.append({"image_id": rel, "split": "train", "pid": pid + 1, "camid": n % 6, "dataset": "bench"})
            caps += [{"image_id": rel, "caption_idx": j, "caption": f"person {pid} caption {j}"} for j in range(2)]
    lmdb = tmp / "bench-train.lmdb"
    caps_path = tmp / "captions.parquet"
    pd.DataFrame(caps).to_parquet(caps_path)
    pack_split(pd.DataFrame(rows), root, lmdb, captions=pd.DataFrame(caps), relabel=True)
    return lmdb, caps_path


def loader_throughput(cfg, stage, device, step, text_dim, steps, warmup, lmdb, caps, decode: str,
                      profile_path: Path | None = None) -> dict:
    """The real P x K loader over the throwaway LMDB (``decode``: worker or device): on its own,
    then feeding ``step`` (and a host-time profile of 10 such steps to ``profile_path``)."""
    from dmf_core.data.loading.device_augment import BatchAugment
    from dmf_core.data.loading.loader import build_train_loader, set_epoch

    st = cfg.pretrain if stage == "pretrain" else cfg.finetune
    img = cfg.model.image
    loader = build_train_loader(lmdb, cfg.augment, img.height, img.width, st.P, st.K, cfg.seed,
                                num_workers=cfg.train.num_workers, captions=caps if text_dim else None,
                                pin_memory=device.type == "cuda", encoded=decode == "device")
    on_device = BatchAugment(img.height, img.width, cfg.augment, device) if decode == "device" else None

    def images_of(batch):
        if on_device is not None:  # train.decode=device: decode + augment here, as the loop does
            return on_device(batch)
        return batch["image"].to(device, non_blocking=True)

    def batches():
        epoch = 0
        while True:
            set_epoch(loader, epoch)
            yield from loader
            epoch += 1

    it = batches()
    # the workers' first batches are ready before timing starts: drain them in the warm-up, or
    # the loader looks faster than it runs
    warmup = max(warmup, cfg.train.num_workers * (loader.prefetch_factor or 0))

    def load_only():
        return len(images_of(next(it)))

    def load_and_step():
        batch = next(it)
        images = images_of(batch)
        labels = batch["label"].to(device, non_blocking=True)
        if text_dim:  # stand-in for the cached frozen-encoder states
            states = torch.randn(len(images), CAPTION_TOKENS, text_dim, device=device)
            mask = torch.ones(len(images), CAPTION_TOKENS, dtype=torch.bool, device=device)
            step(images, labels, states, mask)
        else:
            step(images, labels)
        return len(images)

    rates = {f"loader_alone_{decode}": timed(device, load_only, steps, warmup),
             f"loader_and_step_{decode}": timed(device, load_and_step, steps, warmup)}
    if profile_path is not None:
        profile_table(device, load_and_step, 10, profile_path, by="host")
    return rates


def measure_stage(args, cfg, stage, device, precision, lmdb, caps) -> dict:
    """Compute alone, then (with a loader) each decode path feeding the same compiled step."""
    st = cfg.pretrain if stage == "pretrain" else cfg.finetune
    t0 = time.perf_counter()
    step, model, with_text = step_fn(cfg, stage, device, precision, args.compile, args.scope, args.text_dim,
                                     num_classes=args.ids if lmdb else None)
    images, labels, states, mask = synthetic_inputs(cfg, stage, device, model, with_text)
    batch = len(images)

    def compute():
        step(images, labels, states, mask)
        return batch

    compute()
    _sync(device)
    entry = {"batch": st.P * st.K, "first_step_s": round(time.perf_counter() - t0, 1),
             "compute_images_per_s": round(timed(device, compute, args.steps, args.warmup), 1)}
    print(stage, json.dumps(entry), flush=True)
    if args.profile_dir:
        profile_table(device, compute, 5, args.profile_dir / f"profile_{stage}.txt")
    text_dim = model.text_proj.in_features if with_text else 0
    decodes = (args.decode or [cfg.train.decode]) if lmdb is not None else []
    for decode in decodes:
        prof = args.profile_dir / f"profile_{stage}_loader_{decode}.txt" if args.profile_dir else None
        rates = loader_throughput(cfg, stage, device, step, text_dim, args.steps, args.warmup, lmdb, caps, decode,
                                  prof)
        entry.update({k + "_images_per_s": round(v, 1) for k, v in rates.items()})
        print(stage, json.dumps(entry), flush=True)
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", choices=["params", "tiny"], default="params")
    ap.add_argument("--stage", choices=["pretrain", "finetune", "both"], default="both")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--loader", action="store_true", help="also measure with the real LMDB loader")
    ap.add_argument("--ids", type=int, default=32, help="identities in the throwaway LMDB")
    ap.add_argument("--per-id", type=int, default=16)
    ap.add_argument("--compile", nargs="?", const="default", default=None,
                    choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                    help="torch.compile the model (mode; reduce-overhead adds CUDA graphs)")
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default: train.num_workers)")
    ap.add_argument("--decode", choices=["worker", "device"], nargs="+", default=None,
                    help="where the loader's images are decoded and augmented, one measurement each "
                         "(default: train.decode)")
    ap.add_argument("--scope", choices=["step", "model"], default="step",
                    help="what --compile compiles: model and losses as one graph (the training loop) "
                         "or the model alone (before 2026-12-04)")
    ap.add_argument("--profile-dir", type=Path, default=None,
                    help="write torch.profiler tables here: 5 steps per stage by device time, and "
                         "10 loader + step iterations per decode path by host time")
    ap.add_argument("--text-dim", type=int, default=None,
                    help="width of the caption states (default: read from the text encoder's config; "
                         "give it where that encoder is not on disk)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    params = yaml.safe_load(Path(args.params).read_text())
    if args.profile == "tiny":
        params = tiny(params)
    params["model"]["image"]["pretrained"] = None
    if args.workers is not None:
        params["train"]["num_workers"] = args.workers
    cfg = config_from_dict(params)
    device = torch.device(args.device)
    torch.set_num_threads(cfg.train.threads)
    precision = args.precision or cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    stages = ["pretrain", "finetune"] if args.stage == "both" else [args.stage]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "precision": precision, "torch": torch.__version__,
        "image": f"{cfg.model.image.height}x{cfg.model.image.width}",
        "vit": f"depth {cfg.model.image.depth} dim {cfg.model.image.dim}",
        "fusion": f"{cfg.fusion.layers}x{cfg.fusion.dim} ({cfg.fusion.mode})",
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "loader_workers": cfg.train.num_workers, "compiled": args.compile, "compile_scope": args.scope,
        "command": "python " + " ".join(sys.argv),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.profile_dir:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    tmp, lmdb, caps = None, None, None
    if args.loader:
        tmp = tempfile.TemporaryDirectory(prefix="dmf-bench-")
        lmdb, caps = pack_random_lmdb(Path(tmp.name), args.ids, args.per_id,
                                      cfg.model.image.height, cfg.model.image.width)
    for stage in stages:
        result[stage] = measure_stage(args, cfg, stage, device, precision, lmdb, caps)
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    if tmp is not None:
        tmp.cleanup()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
