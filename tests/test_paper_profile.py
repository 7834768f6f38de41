"""The paper profile's stages, end to end, on miniature datasets in the real archive layouts.

configs/paper.yaml as shipped, with only sizes overridden (tiny ViT, one epoch, small P x K,
64x32 packing) and each dataset's sha256 + ``allow_partial`` set for the miniature archives:
every real layout (FineGPR + attribute file, Market-1501, MSMT17 V1 and its combine-all reading,
RandPerson, CUHK03-NP) goes through download -> captions -> pack -> encode_captions -> pretrain -> finetune for all
four paper sources -> evaluate on all three paper targets -> report. The stages run in this
process (one import of torch instead of ~25); the DVC wiring itself is what
test_pipeline_e2e checks on the demo profile.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from _archives import (
    build_cuhk03np,
    build_cuhksysu,
    build_finegpr,
    build_market,
    build_msmt17,
    build_randperson,
    make_tar,
    make_zip,
)

from dmf_core.config import load_config
from dmf_core.data.captions.attributes import ATTRIBUTE_CODES, ATTRIBUTE_COLUMNS, write_attributes

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _archives(src: Path, archives: Path) -> None:
    """Miniature archives under the file names configs/paper.yaml expects."""
    build_finegpr(src / "finegpr", ids=4, per_id=4)
    build_market(src / "market", train_ids=4, test_ids=3)
    build_msmt17(src / "msmt17", version="V1", train_ids=4, test_ids=3)
    build_randperson(src / "randperson", ids=4)
    build_cuhk03np(src / "cuhk03np", train_ids=4, test_ids=3)
    make_zip(src / "finegpr", archives / "FineGPR.zip")
    make_zip(src / "market", archives / "Market-1501-v15.09.15.zip")
    make_tar(src / "msmt17", archives / "MSMT17_V1.tar.gz")
    make_zip(src / "randperson", archives / "randperson_subset.zip")
    make_zip(src / "cuhk03np", archives / "cuhk03-np.zip")
    rng = np.random.default_rng(0)
    pids = [1, 3, 5, 7]  # build_finegpr's identities
    attrs = pd.DataFrame({"pid": pids, **{c: rng.choice(list(ATTRIBUTE_CODES[c]), size=len(pids))
                                          for c in ATTRIBUTE_COLUMNS}})
    write_attributes(attrs, archives / "FineGPR_attributes.csv")


def _miniature_paper_params(archives: Path, profile: str = "paper") -> dict:
    params = yaml.safe_load((ROOT / "configs" / f"{profile}.yaml").read_text())
    for spec in params["datasets"].values():
        spec["sha256"] = hashlib.sha256((archives.parent.parent / spec["location"]).read_bytes()).hexdigest()
        spec["allow_partial"] = True  # miniature: the official statistics cannot match
    params["pack"]["resize"] = [64, 32]
    params["model"]["image"].update(depth=1, dim=32, heads=2, height=64, width=32, pretrained=None)
    params["model"]["text"]["name"] = "minilm"  # the paper names BERT-base; no hub here
    params["fusion"].update(dim=32, layers=1, heads=2)
    params["pretrain"].update(epochs=1, P=2, K=2, warmup_epochs=0, holdout_ids=1)
    params["finetune"].update(epochs=1, P=2, K=2, warmup_epochs=0)
    params["train"].update(num_workers=0, threads=2)
    params["evaluate"].update(batch_size=16, ranked_list_queries=1)
    return params


def test_paper_profile_stages_on_miniature_real_layouts(tmp_path, monkeypatch):
    _archives(tmp_path / "src", tmp_path / "data" / "archives")
    params = _miniature_paper_params(tmp_path / "data" / "archives")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    cfg = load_config("params.yaml")
    assert cfg.train.compile == "reduce-overhead"  # kept from the paper profile: eager on CPU

    download, captions, pack = _stage("download"), _stage("captions"), _stage("pack")
    for name in params["datasets"]:
        download.main(cfg, name)
        assert not Path(f"reports/stats/datasets/{name}.bad_images.txt").read_text().strip()
    captions.main(cfg)
    for name in params["datasets"]:
        pack.main(cfg, name)
    _stage("encode_captions").main(cfg)
    _stage("pretrain").main(cfg)
    assert json.loads(Path("reports/facts/pretrain.json").read_text())["run"]["captions_encoded"] == 0
    finetune, evaluate = _stage("finetune"), _stage("evaluate")
    for target in cfg.evaluate.targets:
        evaluate.main(cfg, "pretrain", target)
    for source in cfg.finetune.sources:
        _stage("compose").main(cfg, source)
        finetune.main(cfg, source)
        for target in cfg.evaluate.targets:
            evaluate.main(cfg, source, target)
    _stage("report").main(cfg)

    splits = {name: json.loads(Path(f"reports/stats/datasets/{name}.json").read_text())["splits"]
              for name in params["datasets"]}
    assert splits["finegpr"] == {"train": {"images": 16, "ids": 4}}
    assert splits["market1501"]["query"] == {"images": 3, "ids": 3}
    assert splits["msmt17_all"]["train"]["ids"] == 7  # combine-all: train + test identities
    assert splits["cuhk03np"]["train"]["ids"] == 4  # the detected variant (registry: cuhk03np_detected)
    assert set(splits["randperson"]) == {"train"}

    caps = pd.read_parquet("data/captions/finegpr.parquet")
    assert len(caps) == 16 * cfg.captions.per_image and caps["caption"].str.len().min() > 20

    matrix = json.loads(Path("reports/eval_matrix.json").read_text())
    assert matrix["sources"] == ["pretrain", *sorted(cfg.finetune.sources)]
    assert matrix["targets"] == sorted(cfg.evaluate.targets)
    # msmt17_all trains on MSMT17's query and gallery: that cell is flagged and out of the means
    assert "not_transfer" in matrix["cells"]["msmt17_all"]["msmt17"]
    for source in ["pretrain", *cfg.finetune.sources]:
        for target in cfg.evaluate.targets:
            cell = matrix["cells"][source][target]
            for record in (cell, cell["untrained"]):
                for key in ("rank1", "mAP", "mINP"):
                    assert 0.0 <= record[key] <= 100.0 and math.isfinite(record[key])
    assert Path("reports/eval_matrix.md").read_text().count("market1501") >= 2


def test_protocol3_profile_on_miniature_real_layouts(tmp_path, monkeypatch):
    """configs/protocol3.yaml as shipped, sizes cut: three rows of three datasets, CUHK-SYSU in
    each, trained on the sources' train, query and gallery images from the DMF Stage I model; each
    row's cross-domain mean is the one target it leaves out."""
    src, archives = tmp_path / "src", tmp_path / "data" / "archives"
    _archives(src, archives)
    build_msmt17(src / "msmt17_v2", version="V2", train_ids=4, test_ids=3)
    make_tar(src / "msmt17_v2", archives / "MSMT17_V2.tar.gz")
    build_cuhksysu(src / "cuhksysu", ids=3)
    make_zip(src / "cuhksysu", archives / "cuhksysu.zip")
    params = _miniature_paper_params(archives, "protocol3")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    cfg = load_config("params.yaml")
    for name in params["datasets"]:
        _stage("download").main(cfg, name)
        _stage("pack").main(cfg, name)
    _stage("captions").main(cfg)
    _stage("encode_captions").main(cfg)
    _stage("pretrain").main(cfg)
    for row in cfg.evaluate.rows:
        if row != "pretrain":
            _stage("compose").main(cfg, row)
            _stage("finetune").main(cfg, row)
        for target in cfg.evaluate.targets:
            _stage("evaluate").main(cfg, row, target)
    _stage("report").main(cfg)

    # market1501: 4 train + 3 test identities (distractors and junk out); msmt17: 4 + 3; cuhksysu: 3
    ids = {"market1501": 7, "msmt17": 7, "cuhk03np": 4 + 3, "cuhksysu": 3}
    matrix = json.loads(Path("reports/eval_matrix.json").read_text())
    for row in cfg.finetune.sources:
        meta = json.loads(Path(f"models/{row}/meta.json").read_text())
        assert meta["num_classes"] == sum(ids[p] for p in row.split("+")), row
        (left_out,) = set(cfg.evaluate.targets) - set(row.split("+"))
        assert matrix["cross_domain"][row]["mAP"] == round(matrix["cells"][row][left_out]["mAP"], 2)
        plan = json.loads(Path(f"data/rows/{row}.json").read_text())
        assert {p["dataset"]: p["absent"] for p in plan["parts"]}["cuhksysu"] == ["query", "gallery"]
    assert sorted(matrix["sources"][1:]) == sorted(cfg.finetune.sources)

