"""P x K identity batch sampler, DDP-aware and reproducible from (seed, epoch).

One epoch's plan is a pure function of ``(labels, P, K, seed, epoch)``, computed identically on
every rank:

1. each identity's images are shuffled and cut into groups of K (an identity with fewer than K
   images gives one group drawn with replacement; an incomplete last group is dropped);
2. global batches of P groups of P *distinct* identities are formed greedily, each step taking
   the P identities with the most groups left (random tie-break). This uses as many groups as
   any P-distinct batching can, so the number of batches depends only on the group counts and is
   the same every epoch;
3. the global batches are shuffled, cut to a multiple of ``world_size``, and rank r takes
   batches ``r, r + world_size, ...``.

With ``domains`` (per image, the index of its dataset, for a row of several datasets), step 2
runs per dataset: each global batch takes ``P / D`` identities from each
of the D datasets, as many batches as the scarcest dataset allows. Without it the identities of all
datasets are one pool (uniform over identities, as torchreid and fast-reid train on a list of datasets).

So every rank gets whole identity groups, ranks see disjoint groups within an epoch, all ranks
yield the same number of batches, and the order is reproducible from (seed, epoch). A batch is
``P * K`` dataset indices, K consecutive indices per identity.
"""

from __future__ import annotations

import numpy as np
import torch


class PKSampler(torch.utils.data.Sampler[list[int]]):
    """Batch sampler yielding lists of ``P * K`` indices (pass as ``batch_sampler=``)."""

    def __init__(self, labels, P: int, K: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 exclude_from: int | None = None, domains=None):
        """``exclude_from``: labels >= this are never drawn (identities held out of training).
        ``domains``: per image, the index of its dataset; given, each batch takes ``P / D``
        identities from each of the D datasets (P must divide evenly)."""
        labels = np.asarray(labels, dtype=np.int64)
        if labels.ndim != 1:
            raise ValueError(f"PKSampler: labels must be 1-D, got shape {labels.shape}")
        if P <= 0 or K <= 0:
            raise ValueError(f"PKSampler: P and K must be positive, got P={P}, K={K}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"PKSampler: rank {rank} not in [0, world_size={world_size})")
        if (labels < 0).any():
            raise ValueError("PKSampler: labels contain negative values (not a relabelled train split?)")
        self.P, self.K, self.seed = int(P), int(K), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        order = np.argsort(labels, kind="stable")
        if exclude_from is not None:
            order = order[labels[order] < exclude_from]
        ids, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        self._ids = ids
        self._members = [order[s:s + c] for s, c in zip(starts, counts)]
        self._groups_per_id = np.maximum(1, counts // self.K)
        if len(ids) < self.P:
            raise ValueError(f"PKSampler: {len(ids)} identities, fewer than P={self.P}")
        self._domain_ids = None if domains is None else self._split_domains(np.asarray(domains), order, starts)
        self.epoch = 0
        self._plan_cache: tuple[int, list[np.ndarray]] | None = None
        self._num_batches = self._count_batches()
        if self._num_batches == 0:
            raise ValueError(
                f"PKSampler: {len(ids)} identities with K={self.K} give fewer global batches of P={self.P} "
                f"than world_size={self.world_size}"
            )

    # -- plan -------------------------------------------------------------------------------------

    def _split_domains(self, domains: np.ndarray, order: np.ndarray, starts: np.ndarray) -> list[np.ndarray]:
        """Positions (in ``self._ids``) of each dataset's identities; refuses an identity in two."""
        per_id = domains[order][starts]
        mixed = [i for i, m in enumerate(self._members) if (domains[m] != per_id[i]).any()]
        if mixed:
            raise ValueError(f"PKSampler: identity {self._ids[mixed[0]]} has images in two datasets")
        parts = [np.flatnonzero(per_id == d) for d in np.unique(per_id)]
        if self.P % len(parts):
            raise ValueError(f"PKSampler: P={self.P} cannot be split evenly over {len(parts)} datasets")
        return parts

    @staticmethod
    def _optimal_batches(groups_per_id: np.ndarray, P: int) -> int:
        """Largest-first batching reaches the optimum: the largest t with
        sum_i min(groups_i, t) >= P * t (no randomness needed)."""
        lo, hi = 0, int(groups_per_id.sum()) // P
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if int(np.minimum(groups_per_id, mid).sum()) >= P * mid:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _global_count(self) -> int:
        if self._domain_ids is None:
            return self._optimal_batches(self._groups_per_id, self.P)
        share = self.P // len(self._domain_ids)
        return min(self._optimal_batches(self._groups_per_id[d], share) for d in self._domain_ids)

    def _count_batches(self) -> int:
        """Batches per rank."""
        return self._global_count() // self.world_size

    def _draw_groups(self, rng: np.random.Generator) -> list[list[np.ndarray]]:
        K = self.K
        groups: list[list[np.ndarray]] = []
        for members, g in zip(self._members, self._groups_per_id):
            if len(members) < K:
                picked = rng.choice(members, size=K, replace=True)
            else:
                picked = rng.permutation(members)[: g * K]
            groups.append(list(picked.reshape(g, K)))
        return groups

    @staticmethod
    def _largest_first(rng: np.random.Generator, groups_per_id: np.ndarray, P: int) -> list[np.ndarray]:
        """Batches of P distinct identities (positions into ``groups_per_id``), each step taking
        the P with the most groups left, each identity's groups used in order."""
        rem = groups_per_id.astype(np.float64)
        batches = []
        while np.count_nonzero(rem) >= P:
            key = rem + rng.random(len(rem))  # random tie-break among equal remaining counts
            top = np.argpartition(-key, P - 1)[:P]
            top = top[rng.permutation(P)]
            rem[top] -= 1
            batches.append(top)
        return batches

    def _identity_batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        if self._domain_ids is None:
            return self._largest_first(rng, self._groups_per_id, self.P)
        share, count = self.P // len(self._domain_ids), self._global_count()
        per_domain = [[d[b] for b in self._largest_first(rng, self._groups_per_id[d], share)[:count]]
                      for d in self._domain_ids]
        return [np.concatenate(parts) for parts in zip(*per_domain)]

    def _global_plan(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch, 0x9E37])
        groups = self._draw_groups(rng)
        next_group = np.zeros(len(groups), dtype=np.int64)
        batches = []
        for top in self._identity_batches(rng):
            batches.append(np.concatenate([groups[i][next_group[i]] for i in top]))
            next_group[top] += 1
        order = rng.permutation(len(batches))
        usable = (len(batches) // self.world_size) * self.world_size
        return [batches[i] for i in order[:usable]]

    def plan(self, epoch: int | None = None) -> list[np.ndarray]:
        """This rank's batches for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            glob = self._global_plan(epoch)
            self._plan_cache = (epoch, glob[self.rank :: self.world_size])
        return self._plan_cache[1]

    # -- Sampler API -------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self):
        for batch in self.plan():
            yield batch.tolist()
