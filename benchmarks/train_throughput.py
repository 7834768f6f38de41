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
import tempfile
import time
from pathlib import Path

import torch
import yaml

from dmf_core.config import config_from_dict
from dmf_core.model.build import build_model
from dmf_core.train.losses import dmf_losses
from dmf_core.train.schedule import build_optimizer

CAPTION_TOKENS = 36  # typical padded length of a SynthPed/FineGPR caption batch under MiniLM


def tiny(params: dict) -> dict:
    params["model"]["image"].update(depth=1, dim=32, heads=2, height=64, width=32, pretrained=None)
    params["fusion"].update(dim=32, layers=1, heads=2)
    for stage in ("pretrain", "finetune"):
        params[stage].update(P=4, K=4)
    return params


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_fn(cfg, stage: str, device: torch.device, precision: str, compile_model: bool, text_dim=None,
            num_classes=None):
    st = cfg.pretrain if stage == "pretrain" else cfg.finetune
    with_text = stage == "pretrain" and cfg.fusion.mode == "shared"
    num_classes = num_classes or max(st.P * 4, 64)
    model = build_model(cfg, num_classes, with_text=with_text, pretrained=False,
                        text_dim=text_dim).to(device).train()
    opt = build_optimizer(model, st)
    fwd = torch.compile(model, mode=compile_model) if compile_model else model
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    def step(images, labels, states=None, mask=None):
        with autocast:
            out = fwd(images, states, mask) if states is not None else fwd(images)
            loss = dmf_losses(out, labels, cfg)["loss"]
        loss.backward()
        if st.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), st.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, model, with_text


def compute_throughput(cfg, stage, device, precision, steps, warmup, compile_model, text_dim=None) -> float:
    st = cfg.pretrain if stage == "pretrain" else cfg.finetune
    step, model, with_text = step_fn(cfg, stage, device, precision, compile_model, text_dim)
    b = st.P * st.K
    img = cfg.model.image
    images = torch.randn(b, 3, img.height, img.width, device=device)
    labels = torch.arange(st.P, device=device).repeat_interleave(st.K)
    states = mask = None
    if with_text:
        states = torch.randn(b, CAPTION_TOKENS, model.text_proj.in_features, device=device)
        mask = torch.ones(b, CAPTION_TOKENS, dtype=torch.bool, device=device)
    for _ in range(warmup):
        step(images, labels, states, mask)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(images, labels, states, mask)
    _sync(device)
    return steps * b / (time.perf_counter() - t0)


def pack_random_lmdb(tmp: Path, ids: int, per_id: int, height: int, width: int) -> tuple[Path, Path]:
    import numpy as np
    import pandas as pd
    from PIL import Image

    from dmf_core.data.lmdb_store import pack_split

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


def loader_throughput(cfg, stage, device, precision, steps, warmup, compile_model, lmdb, caps,
                      text_dim=None) -> dict:
    from dmf_core.data.device_augment import BatchAugment
    from dmf_core.data.loader import build_train_loader, set_epoch

    st = cfg.pretrain if stage == "pretrain" else cfg.finetune
    img = cfg.model.image
    with_text = stage == "pretrain" and cfg.fusion.mode == "shared"
    loader = build_train_loader(lmdb, cfg.augment, img.height, img.width, st.P, st.K, cfg.seed,
                                num_workers=cfg.train.num_workers, captions=caps if with_text else None,
                                pin_memory=device.type == "cuda", encoded=cfg.train.decode == "device")
    on_device = BatchAugment(img.height, img.width, cfg.augment, device) if cfg.train.decode == "device" else None

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
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(steps):
        n += len(images_of(next(it)))
    _sync(device)
    alone = n / (time.perf_counter() - t0)

    step, model, with_text = step_fn(cfg, stage, device, precision, compile_model, text_dim,
                                     num_classes=int(loader.dataset.labels.max()) + 1)
    text_dim = model.text_proj.in_features if with_text else 0

    def run(batch):
        images = images_of(batch)
        labels = batch["label"].to(device, non_blocking=True)
        if with_text:  # stand-in for the cached frozen-encoder states
            states = torch.randn(len(images), CAPTION_TOKENS, text_dim, device=device)
            mask = torch.ones(len(images), CAPTION_TOKENS, dtype=torch.bool, device=device)
            return step(images, labels, states, mask)
        return step(images, labels)

    for _ in range(warmup):
        run(next(it))
    _sync(device)
    t0 = time.perf_counter()
    n = 0
    for _ in range(steps):
        batch = next(it)
        n += len(batch["label"])
        run(batch)
    _sync(device)
    return {"loader_alone": alone, "loader_and_step": n / (time.perf_counter() - t0)}


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
    ap.add_argument("--decode", choices=["worker", "device"], default=None,
                    help="where images are decoded and augmented (default: train.decode)")
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
    if args.decode is not None:
        params["train"]["decode"] = args.decode
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
        "loader_workers": cfg.train.num_workers, "decode": cfg.train.decode, "compiled": args.compile,
    }
    tmp = None
    if args.loader:
        tmp = tempfile.TemporaryDirectory(prefix="dmf-bench-")
        lmdb, caps = pack_random_lmdb(Path(tmp.name), args.ids, args.per_id,
                                      cfg.model.image.height, cfg.model.image.width)
    for stage in stages:
        st = cfg.pretrain if stage == "pretrain" else cfg.finetune
        entry = {"batch": st.P * st.K, "compute_images_per_s": round(
            compute_throughput(cfg, stage, device, precision, args.steps, args.warmup, args.compile,
                               args.text_dim), 1)}
        if args.loader:
            entry.update({k + "_images_per_s": round(v, 1) for k, v in loader_throughput(
                cfg, stage, device, precision, args.steps, args.warmup, args.compile, lmdb, caps,
                args.text_dim).items()})
        result[stage] = entry
    if tmp is not None:
        tmp.cleanup()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
