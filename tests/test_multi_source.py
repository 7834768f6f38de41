"""Fine-tuning rows of several datasets: names, plans, namespaced identities and cameras, the
sampler over their union, the matrix's means and leakage, and a two-source row on SynthPed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from dmf_core.config import ConfigError, config_from_dict, load_config
from dmf_core.data.loading.loader import ReidImageDataset, build_train_transform
from dmf_core.data.loading.row_plan import check_plan, compose_row, read_row_plan
from dmf_core.data.loading.sampler import PKSampler
from dmf_core.data.loading.union import RowImages, RowTestImages, row_training
from dmf_core.data.store.lmdb_store import pack_split
from dmf_core.eval.matrix import build_matrix
from dmf_core.rows import row_parts, trains_on

ROOT = Path(__file__).resolve().parents[1]


def _pack(name: str, split: str, pids: list[int], cams: list[int]) -> None:
    """A packed split of flat-colour images under data/lmdb/<name>/ (cwd is the project)."""
    raw = Path("raw") / name
    rows = []
    for n, (pid, cam) in enumerate(zip(pids, cams)):
        rel = f"{split}/{pid:04d}_c{cam + 1}_{n:03d}.jpg"
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        colour = (37 * pid + 11 * n) % 255
        Image.fromarray(np.full((16, 8, 3), colour, np.uint8)).save(raw / rel, quality=95)
        rows.append({"image_id": rel, "split": split, "pid": pid, "camid": cam, "dataset": name})
    out = Path("data/lmdb") / name / f"{name}-{split}.lmdb"
    pack_split(pd.DataFrame(rows), raw, out, relabel=split == "train")


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _two_datasets() -> None:
    """``a`` and ``b``: the same pids (1-3) and cameras (0-1), so only namespacing tells them apart."""
    for name in ("a", "b"):
        _pack(name, "train", [1, 1, 2, 2, 3, 3], [0, 1, 0, 1, 0, 1])


def test_row_names_split_into_their_datasets():
    assert row_parts("market1501+cuhk03np+cuhksysu") == ["market1501", "cuhk03np", "cuhksysu"]
    assert trains_on("a+b", "b") and not trains_on("a+b", "c") and not trains_on("pretrain", "pretrain")


def test_identities_and_cameras_never_collide(project):
    _two_datasets()
    plan = compose_row("a+b", ["train"], {"a": "market", "b": "market"})
    images = RowImages(plan, None)
    assert len(images) == 12 and images.num_classes == 6
    assert images.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert images.camids.tolist() == [0, 1] * 3 + [2, 3] * 3
    assert images.domains.tolist() == [0] * 6 + [1] * 6
    assert "b-train.lmdb" in images.image_name(7)
    b = ReidImageDataset(Path("data/lmdb/b/b-train.lmdb"), None)
    assert torch.equal(images[7]["image"], b[1]["image"]) and images[7]["pid"] == 3


def test_a_one_dataset_row_trains_on_the_packed_split_unchanged(project, params_dict):
    """Same labels, same images and the same augmentation per index as the packed split read
    directly: fine-tuning on one source is what it was before rows of several."""
    _pack("a", "train", [4, 4, 9, 9, 7], [0, 1, 0, 1, 1])
    transform = build_train_transform(16, 8, config_from_dict(params_dict).augment)
    row = RowImages(compose_row("a", ["train"], {"a": "market"}), transform, augment_seed=3)
    split = ReidImageDataset(Path("data/lmdb/a/a-train.lmdb"), transform, augment_seed=3)
    for epoch in (0, 1):
        row.set_epoch(epoch)
        split.set_epoch(epoch)
        for i in range(len(split)):
            mine, theirs = row[i], split[i]
            assert torch.equal(mine["image"], theirs["image"])
            assert (mine["label"], mine["camid"]) == (theirs["label"], theirs["camid"])


def test_protocol3_keeps_test_identities_apart_and_drops_market_distractors(project):
    _pack("m", "train", [1, 1, 2, 2], [0, 1, 0, 1])
    _pack("m", "query", [1, 5], [0, 0])           # test pid 1 is another person than train pid 1
    _pack("m", "gallery", [1, 5, 0, 0], [1, 1, 2, 1])  # pid 0: Market's distractors
    _pack("s", "train", [3, 3, 8], [0, 0, 0])      # CUHK-SYSU-like: train only
    plan = compose_row("m+s", ["train", "query", "gallery"], {"m": "market", "s": "cuhksysu"})
    assert plan["parts"][1]["absent"] == ["query", "gallery"]
    images = RowImages(plan, None)
    # m: train 0-1, test pids 1 and 5 -> 2, 3; distractors left out; s follows from 4
    assert images.labels.tolist() == [0, 0, 1, 1, 2, 3, 2, 3, 4, 4, 5]
    assert images.camids.tolist() == [0, 1, 0, 1, 0, 0, 1, 1, 3, 3, 3]  # m has cameras 0-2
    assert len(images) == 11


def test_a_plan_refuses_what_changed_or_is_missing(project):
    _two_datasets()
    plan = compose_row("a+b", ["train"], {"a": "market", "b": "market"})
    _pack("b", "train", [1, 1, 2, 2, 3, 5], [0, 1, 0, 1, 0, 1])  # b re-packed after the plan
    with pytest.raises(ValueError, match="changed since the row's plan"):
        RowImages(plan, None)
    with pytest.raises(FileNotFoundError, match=r"pack@c"):
        compose_row("a+c", ["train"], {"a": "market", "c": "market"})
    Path("a.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match="not of 'a'"):
        read_row_plan(Path("a.json"), "a")
    for bad in ("{ truncated", "[1, 2]"):
        Path("a.json").write_text(bad)
        with pytest.raises(ValueError, match=r"a\.json: not a plan"):
            read_row_plan(Path("a.json"), "a")


def test_health_images_are_the_untrained_test_splits_with_namespaced_identities(project):
    """Two datasets' test pid 5 are two people; Market's distractors are no identity; with its query
    and gallery trained on (Protocol-3) a row has no images left to measure health on."""
    for name in ("a", "b"):
        _pack(name, "train", [1, 1, 2, 2], [0, 1, 0, 1])
        _pack(name, "query", [5, 6], [0, 0])
        _pack(name, "gallery", [5, 6, 0], [1, 1, 1])
    layouts = {"a": "market", "b": "market"}
    plan = compose_row("a+b", ["train"], layouts)
    health = RowTestImages(plan, None)
    assert health.pids.tolist() == [0, 1, 0, 1, 2, 3, 2, 3]  # a: 5 -> 0, 6 -> 1; b: 5 -> 2, 6 -> 3
    assert "b-gallery.lmdb" in health.image_name(7)
    assert len(RowTestImages(compose_row("a+b", ["train", "query", "gallery"], layouts), None)) == 0
    _pack("b", "gallery", [5, 6, 7], [1, 1, 1])  # re-packed after the plan: refused
    with pytest.raises(ValueError, match="changed since the row's plan"):
        RowTestImages(plan, None)


def test_a_plan_composed_for_other_params_is_refused(project, params_dict):
    _two_datasets()
    params_dict["finetune"].update(splits=["train", "query", "gallery"])
    params_dict["datasets"].update(a={"layout": "market", "source": "dir", "location": "mine/a"},
                                   b={"layout": "market", "source": "dir", "location": "mine/b"})
    cfg = config_from_dict(params_dict)
    plan = compose_row("a+b", ["train"], {"a": "market", "b": "market"})
    with pytest.raises(ValueError, match=r"composed for splits \['train'\].*compose@a\+b"):
        check_plan(cfg, plan)
    params_dict["finetune"]["splits"] = ["train"]
    check_plan(config_from_dict(params_dict), plan)


def test_balanced_rows_name_a_dataset_too_small_for_its_share(project, params_dict):
    _pack("a", "train", [1, 1, 2, 2, 3, 3, 4, 4], [0, 1] * 4)
    _pack("b", "train", [1, 1], [0, 1])
    params_dict["finetune"].update(P=4, K=2, sampler="balanced")
    plan = compose_row("a+b", ["train"], {"a": "market", "b": "market"})
    with pytest.raises(ValueError, match="b has 1 training identities, fewer than the 2"):
        row_training(plan, config_from_dict(params_dict))


def test_balanced_batches_on_two_ranks_are_disjoint_and_as_many():
    labels, domains = _labels_of_two_domains(small=12, large=20, per_id=8)
    ranks = [PKSampler(labels, 4, 4, seed=2, rank=r, world_size=2, domains=domains) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    for epoch in (0, 1):
        seen = [np.concatenate(s.plan(epoch)) for s in ranks]
        assert not set(seen[0]) & set(seen[1])
        for s in ranks:
            for batch in s.plan(epoch):
                assert (domains[batch] == 0).sum() == 8  # 2 of the 4 identities, 4 images each


def _labels_of_two_domains(small: int, large: int, per_id: int = 4):
    labels = np.repeat(np.arange(small + large), per_id)
    return labels, (labels >= small).astype(np.int64)


def test_balanced_batches_take_half_their_identities_from_each_dataset():
    labels, domains = _labels_of_two_domains(small=6, large=30)
    balanced = PKSampler(labels, 8, 4, seed=0, domains=domains)
    uniform = PKSampler(labels, 8, 4, seed=0)
    assert len(balanced) == 1 and len(uniform) == 4  # the small dataset bounds balanced batches
    for epoch in range(3):
        for batch in balanced.plan(epoch):
            ids = np.unique(labels[batch])
            assert len(ids) == 8 and (domains[ids * 4] == 0).sum() == 4
        assert len(balanced.plan(epoch)) == len(balanced)
    labels, domains = _labels_of_two_domains(small=20, large=20)
    assert len(PKSampler(labels, 8, 4, seed=1, domains=domains)) == 5  # equal datasets: no loss


def test_balanced_sampling_refuses_what_it_cannot_balance():
    labels, domains = _labels_of_two_domains(small=10, large=10)
    with pytest.raises(ValueError, match="split evenly"):
        PKSampler(labels, 5, 4, seed=0, domains=domains)
    domains[0] = 1  # identity 0 now has images in both datasets
    with pytest.raises(ValueError, match="two datasets"):
        PKSampler(labels, 4, 4, seed=0, domains=domains)


@pytest.mark.parametrize("sources, sampler, splits, message", [
    (["sp_market+sp_nowhere"], "uniform", ["train"], r"\['sp_nowhere'\] not listed"),
    (["sp_market+sp_market"], "uniform", ["train"], "appears twice"),
    (["sp_market+"], "uniform", ["train"], "empty part"),
    (["sp_market+sp_msmt", "sp_msmt+sp_market"], "uniform", ["train"], "same datasets as 'sp_market\\+sp_msmt'"),
    (["sp_market+sp_msmt+sp_cuhk"], "balanced", ["train"], "cannot be split evenly over the 3 datasets"),
    (["sp_market"], "uniform", ["query", "gallery"], "finetune.splits"),
    (["sp_market"], "uniform", ["train", "query"], r"finetune.splits: expected \[train\]"),
])
def test_bad_rows_are_refused_in_one_line(params_dict, sources, sampler, splits, message):
    params_dict["finetune"].update(sources=sources, sampler=sampler, splits=splits)
    params_dict["evaluate"]["rows"] = ["pretrain", *sources]
    with pytest.raises(ConfigError, match=message) as info:
        config_from_dict(params_dict)
    assert "\n" not in str(info.value)


def _cell(mAP: float) -> dict:
    return {"rank1": mAP + 10, "rank5": mAP + 20, "rank10": mAP + 25, "mAP": mAP, "mINP": mAP / 2}


def test_a_rows_cross_domain_mean_leaves_out_every_target_it_trains_on():
    results = {(r, t): _cell(v) for (r, t), v in {
        ("pretrain", "a"): 10, ("pretrain", "b"): 20, ("pretrain", "c"): 30,
        ("a", "a"): 70, ("a", "b"): 25, ("a", "c"): 35,
        ("a+b", "a"): 60, ("a+b", "b"): 50, ("a+b", "c"): 40}.items()}
    matrix = build_matrix(results)
    assert matrix["sources"] == ["pretrain", "a", "a+b"]
    assert matrix["cross_domain"]["a+b"]["mAP"] == 40 and matrix["cross_domain"]["a"]["mAP"] == 30
    assert matrix["in_domain"]["a+b"]["mAP"] == 55 and matrix["in_domain"]["a"]["mAP"] == 70
    assert "pretrain" not in matrix["in_domain"]


def _stage(name: str):
    spec = importlib.util.spec_from_file_location(f"multi_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_part_showing_the_targets_photos_flags_the_cell(project, params_dict):
    """A part showing the target's files under another name trains in its domain (in-domain, not
    transfer); with its query and gallery trained on (Protocol-3) it has seen the target's test images."""
    for splits, why in ((["train"], "in-domain, not a transfer result"),
                        (["train", "query", "gallery"], "sp_cuhk trains on train+query+gallery (finetune.splits)")):
        params_dict["finetune"].update(sources=["sp_market+sp_cuhk"], splits=splits)
        params_dict["evaluate"].update(rows=["pretrain", "sp_market+sp_cuhk"], targets=["sp_msmt"])
        cfg = config_from_dict(params_dict)
        cfg.datasets["sp_cuhk"] = cfg.datasets["sp_cuhk"].__class__(layout="market", source="dir", location="x")
        cfg.datasets["sp_msmt"] = cfg.datasets["sp_msmt"].__class__(layout="market", source="dir", location="x")
        for row in ("pretrain", "sp_market+sp_cuhk"):
            out = Path("reports/eval") / f"{row}__sp_msmt.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(_cell(30)))
        _stage("report").main(cfg)
        matrix = json.loads(Path("reports/eval_matrix.json").read_text())
        assert why in matrix["cells"]["sp_market+sp_cuhk"]["sp_msmt"]["not_transfer"]
        assert matrix["cross_domain"]["sp_market+sp_cuhk"] == {}  # its one target is out of the mean


@pytest.mark.slow
def test_a_two_source_row_on_synthped(project, tiny_params, monkeypatch):
    """compose -> finetune -> evaluate -> report for `sp_market+sp_cuhk`, in this process, from an
    untrained Stage I model: one classifier over both sources' identities, the row named after
    its parts, its cross-domain mean over the one target it does not train on."""
    from dmf_core import paths
    from dmf_core.model.build import build_model
    from dmf_core.runtime import run_stage

    monkeypatch.setenv("DMF_DEBUG", "1")
    row = "sp_market+sp_cuhk"
    p = tiny_params
    p["finetune"].update(sources=[row], sampler="balanced")
    p["evaluate"].update(rows=["pretrain", row], targets=["sp_market", "sp_cuhk", "sp_msmt"])
    p["fusion"]["mode"] = "image_only"
    Path("params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    cfg = load_config("params.yaml")
    for name in ("sp_market", "sp_cuhk", "sp_msmt"):
        run_stage(f"download@{name}", lambda c, n=name: _stage("download").main(c, n))
        run_stage(f"pack@{name}", lambda c, n=name: _stage("pack").main(c, n))
    torch.manual_seed(0)
    build_model(cfg, 4, with_text=False).save_pretrained(paths.pretrain_model_dir(), cfg=cfg, num_classes=4,
                                                         stage="pretrain")
    run_stage(f"compose@{row}", lambda c: _stage("compose").main(c, row))
    plan = json.loads(paths.row_plan_json(row).read_text())
    assert [part["dataset"] for part in plan["parts"]] == ["sp_market", "sp_cuhk"]
    run_stage(f"finetune@{row}", lambda c: _stage("finetune").main(c, row), distributed=True)
    meta = json.loads((paths.finetune_model_dir(row) / "meta.json").read_text())
    assert meta["num_classes"] == 12  # 6 + 6 training identities, none merged
    for target in cfg.evaluate.targets:
        for r in cfg.evaluate.rows:
            run_stage(f"evaluate@{r}-{target}", lambda c, r=r, t=target: _stage("evaluate").main(c, r, t))
    run_stage("report", lambda c: _stage("report").main(c))
    matrix = json.loads(paths.eval_matrix_json().read_text())
    assert matrix["sources"] == ["pretrain", row]
    assert matrix["cross_domain"][row]["mAP"] == round(matrix["cells"][row]["sp_msmt"]["mAP"], 2)
    both = [matrix["cells"][row][t]["mAP"] for t in ("sp_market", "sp_cuhk")]
    assert matrix["in_domain"][row]["mAP"] == round(float(np.mean(both)), 2)
    assert f"| {row} |" in Path("reports/eval_matrix.md").read_text()


def test_a_resume_needs_the_same_sampler_and_the_same_splits(project, params_dict):
    """The resume fingerprint of fine-tuning covers finetune.sampler and every split the row reads."""
    from dmf_core.train.fingerprint import training_fingerprint

    _two_datasets()
    plan = compose_row("a+b", ["train"], {"a": "market", "b": "market"})
    params_dict["finetune"]["P"] = 4

    def fingerprint(sampler: str, row_plan: dict) -> str:
        params_dict["finetune"]["sampler"] = sampler
        cfg = config_from_dict(params_dict)
        row = row_training(row_plan, cfg)
        return training_fingerprint(cfg, "finetune", datasets=row.datasets, inputs=row.inputs,
                                    num_classes=6, num_images=12, world_size=1)

    base = fingerprint("uniform", plan)
    assert fingerprint("uniform", plan) == base and fingerprint("balanced", plan) != base
    _pack("b", "train", [1, 1, 2, 2, 3, 5], [0, 1, 0, 1, 0, 1])
    assert fingerprint("uniform", compose_row("a+b", ["train"], {"a": "market", "b": "market"})) != base
