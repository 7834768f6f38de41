"""P x K identity sampler: batch shape, reproducibility, resume, DDP disjointness (2 gloo ranks)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dmf_core.data.loading.sampler import PKSampler


def toy_labels(seed: int = 0, ids: int = 23) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(ids), rng.integers(1, 13, ids))  # some ids with < K images
    return labels[rng.permutation(len(labels))]


def groups_of(batch: list[int], K: int) -> list[tuple[int, ...]]:
    return [tuple(batch[i:i + K]) for i in range(0, len(batch), K)]


def test_batches_are_p_ids_times_k():
    labels = toy_labels()
    P, K = 4, 4
    s = PKSampler(labels, P, K, seed=0)
    batches = list(s)
    assert len(batches) == len(s) > 0
    for b in batches:
        assert len(b) == P * K
        ids = [labels[list(g)] for g in groups_of(b, K)]
        assert all(len(set(g)) == 1 for g in ids)  # a group = K images of one id
        assert len({g[0] for g in ids}) == P  # P distinct ids
    used = [i for b in batches for i in b]
    small = [i for i in set(labels) if (labels == i).sum() < K]
    assert small, "fixture should have ids with fewer than K images"
    counts = np.bincount(used, minlength=len(labels))
    assert counts.max() <= K  # repeats only from sampling with replacement of small ids
    assert all(len(b) == P * K for b in batches)


def test_reproducible_and_epochs_differ():
    labels = toy_labels()
    a, b = PKSampler(labels, 4, 4, seed=5), PKSampler(labels, 4, 4, seed=5)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b) and len(list(b)) == len(a)
    c = PKSampler(labels, 4, 4, seed=6)
    c.set_epoch(3)
    assert list(a) != list(c)


def test_count_is_exact_for_many_shapes():
    rng = np.random.default_rng(1)
    for _ in range(60):
        n = int(rng.integers(5, 40))
        labels = np.repeat(np.arange(n), rng.integers(1, 15, n))
        P, K, ws = int(rng.integers(1, 6)), int(rng.integers(1, 5)), int(rng.integers(1, 4))
        try:
            samplers = [PKSampler(labels, P, K, seed=2, rank=r, world_size=ws) for r in range(ws)]
        except ValueError:
            continue
        plans = [s.plan(0) for s in samplers]
        assert {len(p) for p in plans} == {len(samplers[0])}
        groups = [g for p in plans for b in p for g in groups_of(b.tolist(), K)]
        assert len(groups) == len(set(groups)) or K == 1 or min(np.bincount(labels)) < K


def test_bad_arguments():
    with pytest.raises(ValueError, match="fewer than P"):
        PKSampler(np.arange(3), 4, 2, seed=0)
    with pytest.raises(ValueError, match="negative"):
        PKSampler(np.array([-1, 0, 1]), 1, 1, seed=0)
    with pytest.raises(ValueError, match="rank"):
        PKSampler(np.arange(8), 2, 1, seed=0, rank=2, world_size=2)


DDP_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, torch.distributed as dist
    from dmf_core.data.loading.sampler import PKSampler
    rank, port = int(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(31), rng.integers(1, 11, 31))
    out = {}
    for epoch in (0, 1):
        s = PKSampler(labels, 4, 3, seed=11, rank=dist.get_rank(), world_size=dist.get_world_size())
        s.set_epoch(epoch)
        out[epoch] = [list(s), list(s)]  # iterate twice: must be the same
    gathered = [None, None]
    dist.all_gather_object(gathered, out)
    if rank == 0:
        import json
        print("RESULT" + json.dumps({"labels": labels.tolist(), "ranks": gathered}))
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_ranks_get_disjoint_whole_groups():
    import json

    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", DDP_SCRIPT, str(r), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    line = next(ln for ln in outs[0][0].splitlines() if ln.startswith("RESULT"))
    res = json.loads(line[len("RESULT"):])
    labels = np.array(res["labels"])
    K = 3
    r0, r1 = res["ranks"]
    for epoch in ("0", "1"):
        b0, b1 = r0[epoch][0], r1[epoch][0]
        assert r0[epoch][0] == r0[epoch][1] and r1[epoch][0] == r1[epoch][1]  # reproducible
        assert len(b0) == len(b1) > 0  # same number of batches on every rank
        g0 = {g for b in b0 for g in groups_of(b, K)}
        g1 = {g for b in b1 for g in groups_of(b, K)}
        assert not g0 & g1  # disjoint groups
        for g in g0 | g1:
            assert len(set(labels[list(g)])) == 1  # whole identity groups
        # images are not shared across ranks unless an id had to be sampled with replacement
        small = {i for i in range(labels.max() + 1) if (labels == i).sum() < K}
        shared = {i for b in b0 for i in b} & {i for b in b1 for i in b}
        assert all(labels[i] in small for i in shared)
    assert r0["0"][0] != r0["1"][0]
    # the same plan without DDP: rank r of world 2 computed locally equals what rank r got
    local = PKSampler(labels, 4, 3, seed=11, rank=1, world_size=2)
    assert [b.tolist() for b in local.plan(1)] == r1["1"][0]
