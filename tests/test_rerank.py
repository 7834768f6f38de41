"""k-reciprocal re-ranking: dense path == torchreid's re_ranking, sparse path == dense, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from _torchreid_ref import rerank_module

from dmf_core.eval.distances import cosine_distance, euclidean_distance
from dmf_core.eval.rerank import (
    RerankMemoryError,
    estimate_sparse_bytes,
    k_reciprocal_rerank,
    rerank_from_features,
)


@pytest.fixture(scope="module")
def ref():
    return rerank_module()


def _feats(seed, nq, ng, d, clusters=0):
    rng = np.random.default_rng(seed)
    if clusters:  # identity-like structure: tight clusters make the k-reciprocal sets non-trivial
        centres = rng.standard_normal((clusters, d))
        q = centres[rng.integers(0, clusters, nq)] + 0.5 * rng.standard_normal((nq, d))
        g = centres[rng.integers(0, clusters, ng)] + 0.5 * rng.standard_normal((ng, d))
    else:
        q, g = rng.standard_normal((nq, d)), rng.standard_normal((ng, d))
    return q.astype(np.float32), g.astype(np.float32)


@pytest.mark.parametrize("seed,nq,ng,d,clusters,metric,k1,k2,lam", [
    (0, 20, 100, 8, 0, "cosine", 20, 6, 0.3),
    (1, 150, 1350, 16, 100, "cosine", 20, 6, 0.3),      # 1,500 items
    (2, 60, 400, 12, 40, "euclidean", 20, 6, 0.3),
    (3, 50, 300, 12, 30, "cosine", 10, 1, 0.5),          # no query expansion
    (4, 40, 200, 6, 0, "euclidean", 7, 3, 0.0),
])
def test_dense_matches_torchreid_and_sparse_matches_dense(ref, seed, nq, ng, d, clusters, metric, k1, k2, lam):
    q, g = _feats(seed, nq, ng, d, clusters)
    dist = cosine_distance if metric == "cosine" else euclidean_distance
    qg, qq, gg = dist(q, g), dist(q, q), dist(g, g)
    want = ref.re_ranking(qg, qq, gg, k1=k1, k2=k2, lambda_value=lam)
    got = k_reciprocal_rerank(qg, qq, gg, k1=k1, k2=k2, lambda_value=lam)
    assert got.shape == (nq, ng) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    sparse = rerank_from_features(q, g, k1=k1, k2=k2, lambda_value=lam, metric=metric)
    np.testing.assert_allclose(sparse, got, atol=1e-5, rtol=0)


def test_float64_distances(ref):
    rng = np.random.default_rng(9)
    x = rng.random((90, 5))
    full = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    qg, qq, gg = full[:30, 30:], full[:30, :30], full[30:, 30:]
    np.testing.assert_allclose(k_reciprocal_rerank(qg, qq, gg), ref.re_ranking(qg, qq, gg), atol=1e-5)


def test_fewer_items_than_k1(ref):
    q, g = _feats(5, 4, 9, 6)
    qg, qq, gg = cosine_distance(q, g), cosine_distance(q, q), cosine_distance(g, g)
    want = ref.re_ranking(qg, qq, gg)
    np.testing.assert_allclose(k_reciprocal_rerank(qg, qq, gg), want, atol=1e-5)
    np.testing.assert_allclose(rerank_from_features(q, g), want, atol=1e-5)


def test_refusals_and_bad_input():
    q, g = _feats(0, 10, 40, 4)
    qg, qq, gg = cosine_distance(q, g), cosine_distance(q, q), cosine_distance(g, g)
    with pytest.raises(RerankMemoryError, match=r"needs about .* GiB"):
        k_reciprocal_rerank(qg, qq, gg, max_memory_bytes=1000)
    with pytest.raises(MemoryError, match="GiB"):
        rerank_from_features(q, g, max_memory_bytes=1000)
    # MSMT17 size: the estimate is stated before any work
    need = estimate_sparse_bytes(11659, 82161)
    assert 3.5 * 2**30 < need < 24 * 2**30
    with pytest.raises(ValueError, match="q_q_dist: expected shape"):
        k_reciprocal_rerank(qg, qq[:, :5], gg)
    with pytest.raises(ValueError, match="g_g_dist: 1 NaN"):
        bad = gg.copy()
        bad[3, 4] = np.nan
        k_reciprocal_rerank(qg, qq, bad)
    with pytest.raises(ValueError, match="k2=30 must not exceed"):
        k_reciprocal_rerank(qg, qq, gg, k2=30)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        rerank_from_features(q, g[:, :3])
    with pytest.raises(ValueError, match="gallery features: empty"):
        rerank_from_features(q, g[:0])
