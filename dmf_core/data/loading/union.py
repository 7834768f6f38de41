"""A fine-tuning row's training data: the packed splits of its plan
(:mod:`dmf_core.data.loading.row_plan`) as one training set. Nothing collides across datasets:

- identities are ``(dataset, group, pid)``, group ``train`` (the train split) or ``test`` (query
  and gallery, Protocol-3: test identities kept apart from train ones, as the DG loaders prefix
  them); labels run 0..n-1 over the datasets in the row's order, each dataset's train labels as
  packed, then its test pids in sorted order;
- cameras are ``(dataset, camid)``: each dataset's camids follow the previous datasets' cameras;
- Market's distractors (layout ``market``, pid 0) never train; junk (pid -1) never reaches a manifest.

The feature health of fine-tuning is measured on the plan's ``health`` splits (the query and
gallery the row does not train on), with identities namespaced the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dmf_core.data.loading.loader import SeededImages, build_test_transform, build_train_transform, pk_loader
from dmf_core.data.loading.row_plan import TEST_SPLITS
from dmf_core.data.loading.sampler import PKSampler
from dmf_core.data.store.lmdb_store import LmdbReader, content_digest


def _open(spec: dict) -> LmdbReader:
    """The split a plan names, refused when its content is no longer what the plan recorded."""
    path = Path(spec["lmdb"])
    if content_digest(path) != spec["digest"]:
        raise ValueError(f"{path}: changed since the row's plan was composed; rerun the compose stage")
    return LmdbReader(path)


class _PlanImages(SeededImages):
    """Images of several packed splits, one index over all of them; subclasses set the labels."""

    def _index(self, readers: list[LmdbReader], keep: list[np.ndarray]) -> None:
        self.readers = readers
        self._reader = np.concatenate([np.full(int(k.sum()), r, np.int64) for r, k in enumerate(keep)] or [[]])
        self._local = np.concatenate([np.flatnonzero(k) for k in keep] or [[]]).astype(np.int64)
        self._names = [r.sidecar["image_id"].to_numpy() for r in readers]

    def stored_bytes(self, i: int) -> bytes:
        return self.readers[self._reader[i]].get_bytes(int(self._local[i]))

    def image_name(self, i: int) -> str:
        r = self._reader[int(i)]
        return f"{self.readers[r].path}: {self._names[r][self._local[int(i)]]}"


class RowImages(_PlanImages):
    """Every image a row trains on (:class:`SeededImages` items), with namespaced ``labels`` (also
    the items' ``pid``), ``camids`` and ``domains`` (the index of each image's dataset)."""

    def __init__(self, plan: dict, transform, *, augment_seed: int | None = None, encoded: bool = False):
        super().__init__(transform, augment_seed=augment_seed, encoded=encoded)
        readers, keep, columns = [], [], {"labels": [], "camids": [], "domains": []}
        label_base = cam_base = 0
        for d, part in enumerate(plan["parts"]):
            opened = {split: _open(spec) for split, spec in part["splits"].items()}
            labels, camids, n_ids = _part_identities(opened, part["drop_pids"])
            for split, reader in opened.items():
                kept = labels[split] >= 0
                columns["labels"].append(labels[split][kept] + label_base)
                columns["camids"].append(camids[split][kept] + cam_base)
                columns["domains"].append(np.full(int(kept.sum()), d, dtype=np.int64))
                readers.append(reader)
                keep.append(kept)
            label_base += n_ids
            cam_base += 1 + max(int(c.max(initial=-1)) for c in camids.values())
        self.labels, self.camids, self.domains = (np.concatenate(columns[k]).astype(np.int64)
                                                  for k in ("labels", "camids", "domains"))
        self.pids = self.labels
        self._index(readers, keep)


class RowTestImages(_PlanImages):
    """The plan's health splits under test transforms: ``pid`` namespaced per dataset (distractors
    left out), so two datasets' pid 5 are two people."""

    def __init__(self, plan: dict, transform):
        super().__init__(transform)
        readers, keep, pids, base = [], [], [], 0
        for part in plan["parts"]:
            opened = [_open(spec) for spec in part.get("health", {}).values()]
            raw = [r.sidecar["pid"].to_numpy(dtype=np.int64) for r in opened]
            known = np.unique(np.concatenate(raw)) if raw else np.zeros(0, np.int64)
            known = known[~np.isin(known, part["drop_pids"])]
            for reader, p in zip(opened, raw):
                kept = np.isin(p, known)
                pids.append(base + np.searchsorted(known, p[kept]))
                readers.append(reader)
                keep.append(kept)
            base += len(known)
        self.pids = np.concatenate(pids).astype(np.int64) if pids else np.zeros(0, np.int64)
        self.labels = self.pids
        self.camids = np.zeros(len(self.pids), np.int64)
        self._index(readers, keep)


def _part_identities(readers: dict[str, LmdbReader], drop_pids: list[int]
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """One dataset's labels per split (-1: not trained on) from 0, its camids, its identity count."""
    sidecars = {split: r.sidecar for split, r in readers.items()}
    train_labels = sidecars["train"]["label"].to_numpy(dtype=np.int64)
    n_train = int(train_labels.max(initial=-1)) + 1
    test = [s for s in TEST_SPLITS if s in sidecars]
    test_pids = np.unique(np.concatenate([sidecars[s]["pid"].to_numpy(dtype=np.int64) for s in test])
                          if test else np.zeros(0, np.int64))
    test_pids = test_pids[~np.isin(test_pids, drop_pids)]
    labels = {"train": train_labels}
    for split in test:
        pids = sidecars[split]["pid"].to_numpy(dtype=np.int64)
        known = np.isin(pids, test_pids)
        labels[split] = np.where(known, n_train + np.searchsorted(test_pids, pids), -1)
    camids = {split: sc["camid"].to_numpy(dtype=np.int64) for split, sc in sidecars.items()}
    return labels, camids, n_train + len(test_pids)


@dataclass
class RowTraining:
    """What fine-tuning reads for a row: the P x K loader, content digests of every split it
    reads (the resume fingerprint), its datasets, and the images it does not train on."""

    loader: torch.utils.data.DataLoader
    datasets: list[str]
    inputs: dict[str, str] = field(default_factory=dict)
    health: RowTestImages | None = None


def row_training(plan: dict, cfg, *, rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> RowTraining:
    """The loader of one rank over a row's images (``build_train_loader``'s contract) and the rest of
    :class:`RowTraining`. ``finetune.sampler: balanced``: each batch takes P / datasets identities
    from each dataset."""
    st, img = cfg.finetune, cfg.model.image
    encoded = cfg.train.decode == "device"
    dataset = RowImages(plan, build_train_transform(img.height, img.width, cfg.augment), augment_seed=cfg.seed,
                        encoded=encoded)
    balanced = st.sampler == "balanced" and len(plan["parts"]) > 1
    if balanced:
        _check_balance(plan, dataset, st.P)
    sampler = PKSampler(dataset.labels, st.P, st.K, seed=cfg.seed, rank=rank, world_size=world_size,
                        domains=dataset.domains if balanced else None)
    loader = pk_loader(dataset, sampler, cfg.seed, num_workers=cfg.train.num_workers, rank=rank,
                       pin_memory=pin_memory)
    health = RowTestImages(plan, build_test_transform(img.height, img.width, cfg.augment))
    splits = {f"{p['dataset']}/{s}": spec["digest"] for p in plan["parts"]
              for s, spec in {**p["splits"], **p.get("health", {})}.items()}
    return RowTraining(loader=loader, datasets=[p["dataset"] for p in plan["parts"]],
                       inputs={"row_splits": " ".join(f"{k}={v}" for k, v in sorted(splits.items()))},
                       health=health if len(health) else None)


def _check_balance(plan: dict, dataset: RowImages, P: int) -> None:
    share = P // len(plan["parts"])
    for d, part in enumerate(plan["parts"]):
        ids = len(np.unique(dataset.labels[dataset.domains == d]))
        if ids < share:
            raise ValueError(f"{plan['row']}: {part['dataset']} has {ids} training identities, fewer than the "
                             f"{share} of each batch that finetune.sampler: balanced takes from it (P={P})")
