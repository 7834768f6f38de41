"""Training helpers shared by the tests: in-memory identity data, tiny configs, toy LMDBs.

Kept out of the test modules so any test file imports them the same way (``tests/`` is on
``sys.path`` under pytest, and for the subprocess scripts that insert it).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from dmf_core.config import config_from_dict
from dmf_core.data.loading.sampler import PKSampler
from dmf_core.train.loop import StageData

COLOURS = ["red", "blue", "green", "black", "white", "gray", "brown", "purple"]


class MemoryReid(torch.utils.data.Dataset):
    """Identity-coloured noise images (+ one of two captions per image), deterministic per index."""

    def __init__(self, ids: int, per_id: int, height: int, width: int, captions: bool, sleep: float = 0.0):
        g = torch.Generator().manual_seed(0)
        self.labels = torch.arange(ids).repeat_interleave(per_id).numpy()
        base = torch.rand(ids, 3, 1, 1, generator=g) * 2 - 1
        noise = torch.randn(len(self.labels), 3, height, width, generator=g) * 0.5
        self.images = base[torch.as_tensor(self.labels)] + noise
        self.captions = captions
        self.sleep = sleep
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.labels)

    def caption(self, i: int, j: int) -> str:
        pid = int(self.labels[i])
        return f"a person in {COLOURS[pid % 8]} clothes, number {pid}, view {j}"

    def __getitem__(self, i: int) -> dict:
        if self.sleep:
            time.sleep(self.sleep)
        img = self.images[i]
        if torch.rand(()) < 0.5:  # a random augmentation, to exercise RNG handling on resume
            img = img.flip(-1)
        item = {"image": img, "label": int(self.labels[i]), "index": i}
        if self.captions:
            item["caption"] = self.caption(i, (i + self.epoch) % 2)
        return item


def memory_stage_data(cfg, stage: str, *, ids: int = 8, per_id: int = 4, rank: int = 0, world_size: int = 1,
                      sleep: float = 0.0) -> StageData:
    st = cfg.pretrain if stage == "pretrain" else cfg.finetune
    with_text = stage == "pretrain" and cfg.fusion.mode == "shared"
    ds = MemoryReid(ids, per_id, cfg.model.image.height, cfg.model.image.width, with_text, sleep)
    sampler = PKSampler(ds.labels, st.P, st.K, seed=cfg.seed, rank=rank, world_size=world_size)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=0)

    def set_epoch(epoch: int) -> None:
        sampler.set_epoch(epoch)
        ds.epoch = epoch

    caps = [ds.caption(i, j) for i in range(len(ds)) for j in range(2)] if with_text else None
    return StageData(loader=loader, num_classes=ids, num_images=len(ds), set_epoch=set_epoch, captions=caps)


def tiny_cfg(params: dict, **stage_overrides):
    p = params
    p["model"]["image"].update(depth=1, dim=32, heads=2, height=32, width=16, patch=8, stride=8)
    p["fusion"].update(dim=32, layers=1, heads=2, mode="image_only")
    p["train"].update(threads=1)
    p["pretrain"]["holdout_ids"] = 0
    for stage in ("pretrain", "finetune"):
        p[stage].update(epochs=2, P=4, K=2, warmup_epochs=1)
        p[stage].update(stage_overrides)
    return config_from_dict(p)


def outputs(tmp: Path, name: str) -> dict:
    base = tmp / name
    return {"out_dir": base / "model", "metrics_path": base / "metrics.json", "facts_path": base / "facts.json",
            "curve_path": base / "curve.tsv", "work_dir": base / "work"}


class StopTraining(RuntimeError):
    """Raised from ``set_epoch`` to leave a checkpoint behind, as a killed run would."""


def stop_at(data: StageData, epoch: int) -> StageData:
    moved = data.set_epoch

    def set_epoch(e: int) -> None:
        if e == epoch:
            raise StopTraining(f"stopped before epoch {e + 1}")
        moved(e)

    data.set_epoch = set_epoch
    return data


def toy_images(tmp_path: Path, ids: int = 6, per_id: int = 4) -> tuple[Path, list[dict]]:
    """Identity-coloured JPEGs under ``tmp_path/raw`` and their manifest rows (one train split)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root, rows = tmp_path / "raw", []
    for pid in range(ids):
        colour = rng.integers(0, 255, 3)
        for n in range(per_id):
            rel = f"{pid + 1:04d}/{pid + 1:04d}_c{n + 1:02d}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            arr = np.clip(colour + rng.normal(0, 20, (32, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / rel, quality=90)
            rows.append({"image_id": rel, "split": "train", "pid": pid + 1, "camid": n, "dataset": "toy"})
    return root, rows


def pack_toy(tmp_path: Path, rows: list[dict], root: Path, caps):
    """Pack ``rows`` with the caption frame ``caps``: the LMDB and the captions parquet."""
    import pandas as pd

    from dmf_core.data.store.lmdb_store import pack_split

    caps_path = tmp_path / "captions.parquet"
    caps.to_parquet(caps_path)
    lmdb = tmp_path / "lmdb" / "toy-train.lmdb"
    pack_split(pd.DataFrame(rows), root, lmdb, captions=caps, relabel=True)
    return lmdb, caps_path
