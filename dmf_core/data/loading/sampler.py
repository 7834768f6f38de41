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
                 exclude_from: int | None = None):
        """``exclude_from``: labels >= this are never drawn (identities held out of training)."""
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
        self.epoch = 0
        self._plan_cache: tuple[int, list[np.ndarray]] | None = None
        self._num_batches = self._count_batches()
        if self._num_batches == 0:
            raise ValueError(
                f"PKSampler: {len(ids)} identities with K={self.K} give fewer global batches of P={self.P} "
                f"than world_size={self.world_size}"
            )

    # -- plan -------------------------------------------------------------------------------------

    def _count_batches(self) -> int:
        """Batches per rank. Largest-first batching reaches the optimum: the largest t with
        sum_i min(groups_i, t) >= P * t (no randomness needed)."""
        c = self._groups_per_id
        lo, hi = 0, int(c.sum()) // self.P
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if int(np.minimum(c, mid).sum()) >= self.P * mid:
                lo = mid
            else:
                hi = mid - 1
        return lo // self.world_size

    def _global_plan(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch, 0x9E37])
        K, P = self.K, self.P
        groups: list[list[np.ndarray]] = []
        for members, g in zip(self._members, self._groups_per_id):
            if len(members) < K:
                picked = rng.choice(members, size=K, replace=True)
            else:
                picked = rng.permutation(members)[: g * K]
            groups.append(list(picked.reshape(g, K)))
        rem = self._groups_per_id.astype(np.float64)
        next_group = np.zeros(len(groups), dtype=np.int64)
        batches = []
        while np.count_nonzero(rem) >= P:
            key = rem + rng.random(len(rem))  # random tie-break among equal remaining counts
            top = np.argpartition(-key, P - 1)[:P]
            top = top[rng.permutation(P)]
            batch = np.concatenate([groups[i][next_group[i]] for i in top])
            next_group[top] += 1
            rem[top] -= 1
            batches.append(batch)
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
