"""evaluate_rank / evaluate_features: exact against torchreid's Python evaluation, ties (a match
ranks after a tied wrong identity, whatever the gallery order or the pids), float64 re-ranking of
float32 ties, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _torchreid_ref import rank_module

from dmf_core.eval import ranking
from dmf_core.eval.distances import cosine_distance, euclidean_distance
from dmf_core.eval.ranking import evaluate_features, evaluate_rank


@pytest.fixture(scope="module")
def ref():
    return rank_module()


def _ids(rng, nq, ng, n_ids, n_cams, distractors=0):
    q_pids = rng.integers(1, n_ids + 1, nq)
    g_pids = rng.integers(1, n_ids + 1, ng)
    if distractors:
        g_pids[rng.choice(ng, distractors, replace=False)] = 0
    return q_pids, g_pids, rng.integers(0, n_cams, nq), rng.integers(0, n_cams, ng)


def _reference(dist, q_pids, g_pids, q_cams, g_cams, max_rank):
    """An independent transcription of the protocol: per query, sort by (distance, is a match) so a
    tied wrong identity comes first, drop same-pid same-camera items, read the match positions."""
    q_pids, g_pids, q_cams, g_cams = map(np.asarray, (q_pids, g_pids, q_cams, g_cams))
    firsts, aps, inps = [], [], []
    for i, row in enumerate(np.asarray(dist, dtype=np.float64)):
        same_pid = g_pids == q_pids[i]
        match = same_pid & (g_cams != q_cams[i])
        keep = ~(same_pid & (g_cams == q_cams[i]))
        order = np.lexsort((match, row))
        pos = np.flatnonzero(match[order][keep[order]])
        if len(pos):
            firsts.append(pos[0])
            aps.append(np.mean(np.arange(1, len(pos) + 1) / (pos + 1.0)))
            inps.append(len(pos) / (pos[-1] + 1.0))
    cmc = np.array([np.mean(np.asarray(firsts) < k) for k in range(1, max_rank + 1)])
    return cmc, float(np.mean(aps)), float(np.mean(inps)), len(firsts)


def _assert_reference(result, dist, q_pids, g_pids, q_cams, g_cams, max_rank):
    cmc, mAP, mINP, num_valid = _reference(dist, q_pids, g_pids, q_cams, g_cams, max_rank)
    np.testing.assert_allclose(result.cmc, cmc, atol=1e-6, rtol=0)
    assert result.mAP == pytest.approx(mAP, abs=1e-12) and result.mINP == pytest.approx(mINP, abs=1e-12)
    assert result.num_valid == num_valid


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
    _assert_reference(ours, dist, q_pids, g_pids, q_cams, g_cams, max_rank)


def test_queries_with_many_matches_take_the_sorted_path(ref):
    # 3 identities in 1,500 gallery items: ~500 matches per query, above SORT_ABOVE, next to rows below it
    rng = np.random.default_rng(11)
    q_pids, g_pids, q_cams, g_cams = _ids(rng, 40, 1500, 3, 4)
    g_pids[:300] = rng.integers(4, 100, 300)  # pids 1-3: ~400 gallery items each; pids 4-99: a few
    q_pids[:20] = rng.integers(4, 100, 20)
    assert (np.bincount(g_pids)[q_pids] > ranking.SORT_ABOVE).any()
    dist = rng.random((40, 1500))
    ours = _compare(ref, dist, q_pids, g_pids, q_cams, g_cams, 50)
    _assert_reference(ours, dist, q_pids, g_pids, q_cams, g_cams, 50)
    tied = np.round(dist * 20) / 20  # and with many ties
    _assert_reference(evaluate_rank(tied, q_pids, g_pids, q_cams, g_cams, 50), tied, q_pids, g_pids, q_cams,
                      g_cams, 50)


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


def test_a_tied_match_ranks_after_the_tied_wrong_identity():
    dist = np.array([[0.5, 0.5, 0.9]], dtype=np.float32)
    for g_pids in ([2, 1, 3], [1, 2, 3]):  # the match after or before the wrong identity in the gallery
        r = evaluate_rank(dist, [1], g_pids, [0], [1, 1, 1], max_rank=3)
        np.testing.assert_allclose(r.cmc, [0.0, 1.0, 1.0])
        assert r.mAP == pytest.approx(0.5) and r.mINP == pytest.approx(0.5)
    # matches tied among themselves are interchangeable: both count, neither is pushed back
    r = evaluate_rank(np.array([[0.5, 0.5, 0.9]]), [1], [1, 1, 3], [0], [1, 1, 1], max_rank=3)
    np.testing.assert_allclose(r.cmc, [1.0, 1.0, 1.0])
    assert r.mAP == pytest.approx(1.0)


def _tied_case(seed=0, nq=60, ng=400, levels=5):
    rng = np.random.default_rng(seed)
    dist = rng.integers(0, levels, (nq, ng)).astype(np.float32)
    return dist, _ids(rng, nq, ng, 12, 3, distractors=20)


def test_ties_do_not_depend_on_gallery_or_query_order():
    dist, (q_pids, g_pids, q_cams, g_cams) = _tied_case()
    base = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=20)
    _assert_reference(base, dist, q_pids, g_pids, q_cams, g_cams, 20)
    rng = np.random.default_rng(1)
    for _ in range(3):
        g = rng.permutation(dist.shape[1])
        r = evaluate_rank(dist[:, g], q_pids, g_pids[g], q_cams, g_cams[g], max_rank=20)
        np.testing.assert_array_equal(r.cmc, base.cmc)
        assert r.mAP == base.mAP and r.mINP == base.mINP  # same sums in the same order: bit-equal
        q = rng.permutation(dist.shape[0])  # queries: the same, up to the order of the float sums
        r = evaluate_rank(dist[q], q_pids[q], g_pids, q_cams[q], g_cams, max_rank=20)
        np.testing.assert_array_equal(r.cmc, base.cmc)
        assert r.mAP == pytest.approx(base.mAP, abs=1e-15) and r.mINP == pytest.approx(base.mINP, abs=1e-15)
    # the gallery sorted by pid (as the packed splits are) changes nothing either
    g = np.argsort(g_pids, kind="stable")
    r = evaluate_rank(dist[:, g], q_pids, g_pids[g], q_cams, g_cams[g], max_rank=20)
    np.testing.assert_array_equal(r.cmc, base.cmc)
    assert r.mAP == base.mAP


def test_ties_do_not_favour_any_pid():
    # collapsed features: every distance equal. Renaming the identities (so that another pid sorts
    # first) must not change the result, and every query gets the same, lowest, score.
    rng = np.random.default_rng(2)
    q_pids, g_pids, q_cams, g_cams = _ids(rng, 50, 300, 20, 4)
    dist = np.full((50, 300), 0.25, dtype=np.float32)
    base = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    _assert_reference(base, dist, q_pids, g_pids, q_cams, g_cams, 10)
    rename = rng.permutation(21)
    r = evaluate_rank(dist, rename[q_pids], rename[g_pids], q_cams, g_cams, max_rank=10)
    np.testing.assert_array_equal(r.cmc, base.cmc)
    assert r.mAP == pytest.approx(base.mAP, abs=1e-15)
    assert base.cmc[0] == 0.0  # every match ranks after all the query's kept wrong identities


@pytest.mark.parametrize("metric,as_tensor", [("cosine", False), ("euclidean", False), ("cosine", True)])
def test_float32_ties_are_broken_in_float64_from_features(metric, as_tensor):
    # g0 and g1 are 1e-5 and 2e-5 from the query: in float32 both distances round to 0 (cosine:
    # 1 - 1; squared euclidean: 1 + 1 - 2), in float64 they differ. The match is g0, the nearer one.
    qf = np.array([[1.0, 0.0]], np.float32)
    gf = np.array([[1.0, 1e-5], [1.0, 2e-5], [0.0, 1.0]], np.float32)
    ids = ([1], [1, 2, 3], [0], [1, 1, 1])
    dist = (cosine_distance if metric == "cosine" else euclidean_distance)(qf, gf)
    assert dist[0, 0] == dist[0, 1]
    assert evaluate_rank(dist, *ids, max_rank=3).cmc[0] == 0.0  # tied in float32: the match after
    if as_tensor:
        qf, gf = torch.from_numpy(qf), torch.from_numpy(gf)
    r = evaluate_features(qf, gf, *ids, max_rank=3, metric=metric)
    np.testing.assert_allclose(r.cmc, [1.0, 1.0, 1.0])
    assert r.extra == {"float64_rows": 1, "tie_rows": 0}
    # identical gallery features stay tied in float64: the match ranks after the wrong identity
    r = evaluate_features(qf, np.array([[1.0, 1e-5], [1.0, 1e-5], [0.0, 1.0]], np.float32), *ids, max_rank=3)
    np.testing.assert_allclose(r.cmc, [0.0, 1.0, 1.0])
    assert r.extra == {"float64_rows": 1, "tie_rows": 1}


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


def test_ties_from_features_do_not_depend_on_gallery_order():
    # coarse features: many gallery items share a feature vector exactly, so float64 ties remain
    rng = np.random.default_rng(4)
    qf = rng.integers(0, 3, (40, 4)).astype(np.float32)
    gf = rng.integers(0, 3, (300, 4)).astype(np.float32)
    q_pids, g_pids, q_cams, g_cams = _ids(rng, 40, 300, 10, 3)
    base = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, max_rank=20)
    assert base.extra["tie_rows"] > 0
    g = rng.permutation(300)
    r = evaluate_features(qf, gf[g], q_pids, g_pids[g], q_cams, g_cams[g], max_rank=20)
    np.testing.assert_array_equal(r.cmc, base.cmc)
    assert r.mAP == base.mAP and r.extra == base.extra
