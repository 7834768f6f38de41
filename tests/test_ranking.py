"""evaluate_rank / evaluate_features: exact against torchreid's Python evaluation, ties, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _torchreid_ref import rank_module

from dmf_core.eval.distances import cosine_distance, euclidean_distance
from dmf_core.eval.ranking import evaluate_features, evaluate_rank, evaluate_rank_argsort


@pytest.fixture(scope="module")
def ref():
    return rank_module()


def _ids(rng, nq, ng, n_ids, n_cams, distractors=0):
    q_pids = rng.integers(1, n_ids + 1, nq)
    g_pids = rng.integers(1, n_ids + 1, ng)
    if distractors:
        g_pids[rng.choice(ng, distractors, replace=False)] = 0
    return q_pids, g_pids, rng.integers(0, n_cams, nq), rng.integers(0, n_cams, ng)


def _compare(ref, dist, q_pids, g_pids, q_cams, g_cams, max_rank):
    ours = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank)
    cmc, mAP = ref.evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank, use_cython=False)
    n = len(cmc)
    np.testing.assert_allclose(ours.cmc[:n], cmc, atol=1e-6, rtol=0)
    assert abs(ours.mAP - mAP) < 1e-6
    assert len(ours.cmc) == max_rank
    return ours


@pytest.mark.parametrize("seed,nq,ng,n_ids,n_cams,max_rank,distractors", [
    (0, 50, 300, 40, 6, 50, 0),
    (1, 200, 1500, 150, 2, 20, 100),
    (2, 500, 4000, 400, 8, 50, 500),
    (3, 30, 80, 200, 3, 10, 5),      # many queries without any true match
    (4, 17, 200, 5, 1, 50, 0),       # one camera: every same-pid item is removed -> only distractor ids
])
def test_matches_torchreid(ref, seed, nq, ng, n_ids, n_cams, max_rank, distractors):
    rng = np.random.default_rng(seed)
    q_pids, g_pids, q_cams, g_cams = _ids(rng, nq, ng, n_ids, n_cams, distractors)
    if n_cams == 1:  # make some queries valid: a second camera for part of the gallery
        g_cams[: ng // 2] = 1
    dist = rng.random((nq, ng))  # float64, tie-free
    ours = _compare(ref, dist, q_pids, g_pids, q_cams, g_cams, max_rank)
    base = evaluate_rank_argsort(dist, q_pids, g_pids, q_cams, g_cams, max_rank)
    np.testing.assert_allclose(base.cmc, ours.cmc, atol=1e-7)
    assert abs(base.mINP - ours.mINP) < 1e-12 and base.num_valid == ours.num_valid


def test_float32_from_features_and_minp(ref):
    rng = np.random.default_rng(5)
    qf, gf = rng.standard_normal((120, 32)).astype(np.float32), rng.standard_normal((900, 32)).astype(np.float32)
    q_pids, g_pids, q_cams, g_cams = _ids(rng, 120, 900, 60, 6, 50)
    for metric, fn in (("cosine", cosine_distance), ("euclidean", euclidean_distance)):
        dist = fn(qf, gf)
        ours = _compare(ref, dist, q_pids, g_pids, q_cams, g_cams, 50)
        chunked = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, 50, metric=metric, chunk=7)
        np.testing.assert_allclose(chunked.cmc, ours.cmc, atol=1e-6)
        assert abs(chunked.mAP - ours.mAP) < 1e-6 and abs(chunked.mINP - ours.mINP) < 1e-6
        # mINP, fast-reid definition, directly
        inp = []
        order = np.argsort(dist, axis=1, kind="stable")
        for i in range(len(dist)):
            o = order[i]
            keep = ~((g_pids[o] == q_pids[i]) & (g_cams[o] == q_cams[i]))
            raw = (g_pids[o] == q_pids[i])[keep]
            if raw.any():
                last = np.flatnonzero(raw).max()
                inp.append(raw.cumsum()[last] / (last + 1.0))
        assert abs(np.mean(inp) - ours.mINP) < 1e-9 and len(inp) == ours.num_valid


def test_max_rank_beyond_gallery(ref):
    rng = np.random.default_rng(7)
    q_pids, g_pids = rng.integers(0, 4, 6), rng.integers(0, 4, 12)
    q_cams, g_cams = np.zeros(6, int), np.ones(12, int)  # nothing removed: torchreid can run it
    dist = rng.random((6, 12))
    ours = _compare(ref, dist, q_pids, g_pids, q_cams, g_cams, 30)
    assert ours.cmc[-1] == pytest.approx(1.0) and np.all(np.diff(ours.cmc) >= 0)


def test_ties_are_ordered_by_gallery_index():
    # gallery 0 is a wrong id, gallery 1 the match: equal distance -> the wrong one ranks first
    dist = np.array([[0.5, 0.5, 0.9]], dtype=np.float32)
    r = evaluate_rank(dist, [1], [2, 1, 3], [0], [1, 1, 1], max_rank=3)
    np.testing.assert_allclose(r.cmc, [0.0, 1.0, 1.0])
    assert r.mAP == pytest.approx(0.5) and r.mINP == pytest.approx(0.5)
    r = evaluate_rank(dist, [2], [2, 1, 3], [0], [1, 1, 1], max_rank=3)
    np.testing.assert_allclose(r.cmc, [1.0, 1.0, 1.0])
    # heavily tied random matrix: same as the stable-argsort baseline
    rng = np.random.default_rng(0)
    dist = rng.integers(0, 5, (40, 200)).astype(np.float32)
    ids = _ids(rng, 40, 200, 10, 3)
    a, b = evaluate_rank(dist, *ids, max_rank=20), evaluate_rank_argsort(dist, *ids, max_rank=20)
    np.testing.assert_allclose(a.cmc, b.cmc)
    assert a.mAP == pytest.approx(b.mAP, abs=1e-12) and a.mINP == pytest.approx(b.mINP, abs=1e-12)
    assert a.extra["tie_rows"] > 0


def test_tensor_input_and_chunking():
    rng = np.random.default_rng(3)
    dist = rng.random((33, 100)).astype(np.float32)
    ids = _ids(rng, 33, 100, 20, 4)
    a = evaluate_rank(dist, *ids)
    b = evaluate_rank(torch.from_numpy(dist), *(torch.from_numpy(x) for x in ids), chunk=5)
    np.testing.assert_array_equal(a.cmc, b.cmc)
    assert a.mAP == b.mAP and a.summary()["rank1"] == round(100 * float(a.cmc[0]), 2)


@pytest.mark.parametrize("mutate,match", [
    (lambda d, ids: (d[:, :-1], ids), "g_pids: length"),
    (lambda d, ids: (d, (ids[0][:-1], *ids[1:])), "q_pids: length"),
    (lambda d, ids: (np.where(np.eye(*d.shape) > 0, np.nan, d), ids), "NaN"),
    (lambda d, ids: (np.where(np.eye(*d.shape) > 0, np.inf, d), ids), "NaN/infinite"),
    (lambda d, ids: (d[:0], tuple(x[:0] if i % 2 == 0 else x for i, x in enumerate(ids))), "empty query"),
    (lambda d, ids: (d[:, :0], tuple(x[:0] if i % 2 else x for i, x in enumerate(ids))), "empty gallery"),
    (lambda d, ids: (d, (ids[0] + 100, *ids[1:])), "no valid query"),
    (lambda d, ids: (d[0], ids), "2-D"),
])
def test_bad_input(mutate, match):
    rng = np.random.default_rng(0)
    d = rng.random((4, 6))
    ids = (np.arange(4), np.array([0, 1, 2, 3, 0, 1]), np.zeros(4, int), np.ones(6, int))
    d, ids = mutate(d, ids)
    q_pids, g_pids, q_cams, g_cams = ids
    with pytest.raises(ValueError, match=match):
        evaluate_rank(d, q_pids, g_pids, q_cams, g_cams)


def test_bad_features():
    qf, gf = np.ones((3, 4), np.float32), np.ones((5, 4), np.float32)
    ids = (np.arange(3), np.arange(5), np.zeros(3, int), np.ones(5, int))
    with pytest.raises(ValueError, match="feature dimensions differ"):
        evaluate_features(qf, gf[:, :3], *ids)
    bad = qf.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="query features: 1 NaN"):
        evaluate_features(bad, gf, *ids)
    with pytest.raises(ValueError, match="metric"):
        evaluate_features(qf, gf, *ids, metric="manhattan")
    with pytest.raises(ValueError, match="g_camids: length"):
        evaluate_features(qf, gf, *ids[:3], np.ones(4, int))
