"""features, retrieval, the cross-domain matrix, CMC TSV and ranked-list pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dmf_core.eval.distances import cosine_distance, euclidean_distance
from dmf_core.eval.features import extract_features
from dmf_core.eval.matrix import (
    build_matrix,
    load_eval_results,
    matrix_markdown,
    matrix_metrics,
    plot_heatmap,
    untrained_reference,
    write_cmc_tsv,
)
from dmf_core.eval.retrieval import topk
from dmf_core.eval.visualise import ranked_list_for_queries


def test_extract_features_flip_and_norm():
    torch.manual_seed(0)
    images = torch.rand(10, 3, 8, 4)
    loader = [{"image": images[:4], "pid": torch.zeros(4)}, {"image": images[4:]}]
    weight = torch.randn(3 * 8 * 4, 5)

    def embed(x):
        return x.flatten(1) @ weight

    f = extract_features(embed, loader)
    assert f.dtype == np.float32 and f.shape == (10, 5)
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)
    ff = extract_features(embed, loader, flip=True)
    want = embed(images) + embed(images.flip(3))
    np.testing.assert_allclose(ff, torch.nn.functional.normalize(want, dim=1).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="no batches"):
        extract_features(embed, [])
    with pytest.raises(ValueError, match="NaN"):
        extract_features(lambda x: embed(x) * float("nan"), loader)


def test_distances_and_topk():
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((7, 6)).astype(np.float32), rng.standard_normal((20, 6)).astype(np.float32)
    qn, gn = q / np.linalg.norm(q, axis=1, keepdims=True), g / np.linalg.norm(g, axis=1, keepdims=True)
    np.testing.assert_allclose(cosine_distance(q, g, chunk=3), 1 - qn @ gn.T, atol=1e-6)
    sq = ((q[:, None, :] - g[None]) ** 2).sum(-1)
    np.testing.assert_allclose(euclidean_distance(q, g, chunk=2), sq, rtol=1e-5, atol=1e-5)
    d, i = topk(q, g, 5)
    np.testing.assert_array_equal(i, np.argsort(1 - qn @ gn.T, axis=1)[:, :5])
    assert topk(q, g, 50)[1].shape == (7, 20)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        cosine_distance(q, g[:, :5])
    with pytest.raises(ValueError, match="gallery features: empty"):
        topk(q, g[:0], 3)


def _record(r1, m):
    base = {"rank1": r1, "rank5": r1 + 1, "rank10": r1 + 2, "mAP": m, "mINP": m / 2}
    return {**base, "untrained": {k: v / 10 for k, v in base.items()}, "num_query": 5, "num_gallery": 9,
            "num_valid_query": 5}


def test_matrix_outputs(tmp_path):
    d = tmp_path / "eval"
    d.mkdir()
    cells = {("pretrain", "a"): (40.0, 20.0), ("pretrain", "x"): (30.0, 10.0), ("a", "a"): (90.0, 80.0),
             ("a", "x"): (50.0, 30.0), ("a", "y"): (70.0, 40.0), ("b", "x"): (20.0, 10.0)}
    for (s, t), (r1, m) in cells.items():
        (d / f"{s}__{t}.json").write_text(json.dumps(_record(r1, m)))
    results = load_eval_results(d)
    assert set(results) == set(cells)
    matrix = build_matrix(results)
    assert matrix["sources"] == ["pretrain", "a", "b"]  # the pretrained model's row first
    # cross-domain: the in-domain cell a -> a stays out; for pretrain every target counts
    assert matrix["cross_domain"]["a"]["rank1"] == 60.0 and matrix["cross_domain"]["a"]["mAP"] == 35.0
    assert matrix["in_domain"]["a"]["mAP"] == 80.0 and "pretrain" not in matrix["in_domain"]
    assert matrix["cross_domain"]["pretrain"]["mAP"] == 15.0
    assert matrix["untrained_cross_domain"]["b"]["rank1"] == 2.0
    json.dumps(matrix)
    md = matrix_markdown(matrix)
    assert "| a | 90.0 / 80.0 | 50.0 / 30.0 | 70.0 / 40.0 | **60.0 / 35.0** | 90.0 / 80.0 |" in md
    assert "| b | - | 20.0 / 10.0 | - | **20.0 / 10.0** | - |" in md
    assert "| pretrain | 40.0 / 20.0 | 30.0 / 10.0 | - |" in md
    assert "Untrained reference (the same architecture at initialisation: random weights)" in md
    png = plot_heatmap(matrix, tmp_path / "h.png")
    assert png.stat().st_size > 1000
    (d / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        load_eval_results(d)
    with pytest.raises(ValueError, match="no evaluation results"):
        build_matrix({})


def test_the_untrained_reference_of_the_pretrain_row_serves_every_row():
    fine = {k: v for k, v in _record(50.0, 30.0).items() if k != "untrained"}
    matrix = build_matrix({("pretrain", "x"): {**_record(40.0, 20.0), "untrained_init": "random weights"},
                           ("a", "x"): fine})
    assert matrix["cells"]["a"]["x"]["untrained"] == matrix["cells"]["pretrain"]["x"]["untrained"]
    assert matrix["untrained_cross_domain"]["a"]["rank1"] == 4.0 and matrix["untrained_init"] == "random weights"
    # one untrained model: shown once, per target, with its mean over every target
    md = matrix_markdown(build_matrix({("pretrain", "x"): _record(40.0, 20.0), ("pretrain", "y"): _record(20.0, 10.0),
                                       ("a", "x"): fine}))
    assert md.count("| untrained |") == 1
    assert "| untrained | 4.0 / 2.0 | 2.0 / 1.0 | **3.0 / 1.5** |" in md


def test_rows_that_disagree_on_the_untrained_reference_keep_one_table_row_each():
    other = _record(50.0, 30.0)
    other["untrained"] = {**other["untrained"], "rank1": 9.9}
    matrix = build_matrix({("pretrain", "x"): _record(40.0, 20.0), ("a", "x"): other})
    assert untrained_reference(matrix) is None
    md = matrix_markdown(matrix)
    assert "| untrained |" not in md and "| a | 9.9 / 3.0 |" in md


def test_a_cell_that_is_no_transfer_result_is_flagged_and_left_out_of_the_means():
    results = {("a", "x"): _record(50.0, 30.0), ("a", "y"): _record(70.0, 90.0)}
    matrix = build_matrix(results, not_transfer={("a", "y"): "a's training images hold y's test images"})
    assert matrix["cross_domain"]["a"]["mAP"] == 30.0
    assert matrix["cells"]["a"]["y"]["not_transfer"].startswith("a's training")
    md = matrix_markdown(matrix)
    assert "70.0 / 90.0 †" in md and "† a -> y: not a transfer result" in md
    assert "y" not in matrix_metrics(matrix)["cells"]["a"]


def _leaves(tree: dict, prefix: str = "") -> dict:
    """``{"a.x.mAP": value}``: the columns `dvc exp show` makes of a metrics file."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_leaves(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


def test_matrix_metrics_hold_the_cells_and_row_means_only():
    results = {(s, t): _record(r1, m) for (s, t), (r1, m) in
               {("pretrain", "x"): (10.0, 5.0), ("pretrain", "y"): (20.0, 15.0), ("x", "x"): (50.0, 30.0),
                ("x", "y"): (70.0, 40.0), ("y", "x"): (20.0, 10.0), ("y", "y"): (30.0, 20.0)}.items()}
    matrix = build_matrix(results)
    metrics = matrix_metrics(matrix)
    assert list(metrics) == ["cells", "cross_domain", "in_domain"]
    assert list(metrics["cells"]) == ["pretrain", "x", "y"] and list(metrics["cells"]["x"]) == ["x", "y"]
    assert metrics["cells"]["pretrain"]["y"] == {"mAP": 15.0, "rank1": 20.0}  # the same keys as every row
    assert metrics["cross_domain"] == {"pretrain": {"mAP": 10.0, "rank1": 15.0}, "x": {"mAP": 40.0, "rank1": 70.0},
                                       "y": {"mAP": 10.0, "rank1": 20.0}}
    assert metrics["in_domain"]["y"] == {"mAP": 20.0, "rank1": 30.0}
    columns = _leaves(metrics)
    # mAP and rank-1 of 6 cells, 3 cross-domain and 2 in-domain means: no untrained reference, no counts
    assert len(columns) == 2 * (6 + 3 + 2) and "cells.pretrain.x.mAP" in columns
    assert all(isinstance(v, float) for v in columns.values())
    json.dumps(metrics)


def test_cmc_tsv(tmp_path):
    p = write_cmc_tsv(np.array([0.5, 0.75, 1.0]), tmp_path / "c" / "cmc.tsv")
    assert p.read_text().splitlines() == ["rank\tcmc", "1\t50.0000", "2\t75.0000", "3\t100.0000"]


def test_ranked_list_picture(tmp_path):
    rng = np.random.default_rng(0)
    qf, gf = rng.standard_normal((6, 8)), rng.standard_normal((40, 8))
    q_pids, g_pids = np.arange(6) % 3, np.arange(40) % 5
    q_cams, g_cams = np.zeros(6, int), np.arange(40) % 3
    gf[:6] = qf + 0.01  # near-duplicates: some same-cam (removed) and true matches near the top
    calls = []

    def load_image(kind, index):
        calls.append(kind)
        return Image.new("RGB", (32, 64), (index * 5 % 255, 100, 150))

    out = ranked_list_for_queries(qf, gf, q_pids, g_pids, q_cams, g_cams, load_image=load_image,
                                  num_queries=3, seed=0, out_png=tmp_path / "r.png")
    assert out.exists() and out.stat().st_size < 400_000
    assert calls.count("query") == 3 and calls.count("gallery") >= 30
