"""A fine-tuning row's training data: the packed splits of its plan
(:mod:`dmf_core.data.loading.row_plan`) as one training set. Nothing collides across datasets:

- identities are ``(dataset, group, pid)``, group ``train`` (the train split) or ``test`` (query
  and gallery, Protocol-3: test identities kept apart from train ones, as the DG loaders prefix
  them); labels run 0..n-1 over the datasets in the row's order, each dataset's train labels as
  packed, then its test pids in sorted order;
- cameras are ``(dataset, camid)``: each dataset's camids follow the previous datasets' cameras;
- Market's distractors (layout ``market``, pid 0) never train; junk (pid -1) never reaches a manifest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dmf_core.data.loading.loader import SeededImages, pk_loader, train_augment
from dmf_core.data.loading.sampler import PKSampler
from dmf_core.data.store.lmdb_store import LmdbReader, content_digest

TEST_SPLITS = ("query", "gallery")

class RowImages(SeededImages):
    """Every image a row trains on (:class:`SeededImages` items, index over the whole row), with
    namespaced ``labels`` (also the items' ``pid``), ``camids`` and ``domains`` (dataset index)."""

    def __init__(self, plan: dict, transform, *, augment_seed: int | None = None, encoded: bool = False,
                 expected_meta: dict | None = None):
        super().__init__(transform, augment_seed=augment_seed, encoded=encoded)
        self.readers: list[LmdbReader] = []
        columns: dict[str, list[np.ndarray]] = {k: [] for k in ("labels", "camids", "domains", "reader", "index")}
        label_base = cam_base = 0
        for d, part in enumerate(plan["parts"]):
            readers = {split: self._open(split, spec, expected_meta) for split, spec in part["splits"].items()}
            labels, camids, n_ids = _part_identities(readers, part["drop_pids"])
            for split, reader in readers.items():
                keep = labels[split] >= 0
                columns["labels"].append(labels[split][keep] + label_base)
                columns["camids"].append(camids[split][keep] + cam_base)
                columns["domains"].append(np.full(int(keep.sum()), d, dtype=np.int64))
                columns["reader"].append(np.full(int(keep.sum()), len(self.readers), dtype=np.int64))
                columns["index"].append(np.flatnonzero(keep))
                self.readers.append(reader)
            label_base += n_ids
            cam_base += 1 + max(int(c.max(initial=-1)) for c in camids.values())
        cat = {k: np.concatenate(v).astype(np.int64) if v else np.zeros(0, np.int64) for k, v in columns.items()}
        self.labels, self.camids, self.domains = cat["labels"], cat["camids"], cat["domains"]
        self.pids = self.labels
        self._reader, self._index = cat["reader"], cat["index"]
        self._names = [r.sidecar["image_id"].to_numpy() for r in self.readers]

    @staticmethod
    def _open(split: str, spec: dict, expected_meta: dict | None) -> LmdbReader:
        path = Path(spec["lmdb"])
        if content_digest(path) != spec["digest"]:
            raise ValueError(f"{path}: changed since the row's plan was composed; rerun the compose stage")
        return LmdbReader(path, expected_meta)

    def stored_bytes(self, i: int) -> bytes:
        return self.readers[self._reader[i]].get_bytes(int(self._index[i]))

    def image_name(self, i: int) -> str:
        r = self._reader[int(i)]
        return f"{self.readers[r].path}: {self._names[r][self._index[int(i)]]}"


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


def build_row_loader(plan: dict, cfg_augment, height: int, width: int, P: int, K: int, seed: int, *,
                     balanced: bool, epoch: int = 0, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                     expected_meta: dict | None = None, pin_memory: bool = False, encoded: bool = False):
    """P x K training loader of one rank over a row's images (``build_train_loader``'s contract);
    ``balanced``: each batch takes P / datasets identities from each dataset."""
    dataset = RowImages(plan, train_augment(height, width, cfg_augment, encoded), augment_seed=seed,
                        encoded=encoded, expected_meta=expected_meta)
    sampler = PKSampler(dataset.labels, P, K, seed=seed, rank=rank, world_size=world_size,
                        domains=dataset.domains if balanced and len(plan["parts"]) > 1 else None)
    return pk_loader(dataset, sampler, seed, epoch=epoch, num_workers=num_workers, rank=rank,
                     pin_memory=pin_memory)
