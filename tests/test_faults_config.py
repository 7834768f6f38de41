"""Fault injection, configuration: every size / rate a user can get wrong is one clear error.

test_config.py covers unknown keys, wrong types, non-mapping and non-UTF-8 YAML, and one stage
run; this file sweeps the negative / zero sizes and the divisibility rules key by key, NaN and
infinities, ``source: dir`` folders that DVC would delete, and ``make paper``'s backup.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dmf_core.config import ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def _set(params: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[leaf] = value


CHECKED = [
    ("model.image.depth", 0), ("model.image.dim", -192), ("model.image.heads", 0), ("model.image.patch", -16),
    ("model.image.stride", 0), ("model.image.height", -128), ("model.image.width", 0),
    ("model.text.max_length", -1), ("fusion.dim", 0), ("fusion.layers", -2), ("fusion.heads", -4),
    ("fusion.mlp_ratio", 0.0), ("captions.per_image", 0), ("train.nproc", 0), ("train.threads", -1),
    ("train.checkpoint_every", 0), ("train.num_workers", -1), ("evaluate.batch_size", -128),
    ("evaluate.max_rank", 0), ("pretrain.epochs", 0), ("pretrain.P", -16), ("pretrain.K", 0),
    ("pretrain.lr", -0.001), ("pretrain.accumulate", 0), ("finetune.K", -4), ("finetune.warmup_epochs", -1),
    ("finetune.weight_decay", -0.05), ("fusion.dropout", 1.5), ("augment.erasing", -0.1),
    ("loss.label_smoothing", 1.0), ("pack.resize", [-1, 64]), ("pack.resize", [128]),
]


@pytest.mark.parametrize(("key", "value"), CHECKED, ids=[f"{k}={v}" for k, v in CHECKED])
def test_bad_size_names_the_key(params_dict, key, value):
    _set(params_dict, key, value)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        config_from_dict(params_dict)
    assert repr(value) in str(err.value) or str(value) in str(err.value)


@pytest.mark.parametrize(("dim", "heads", "key"), [
    (250, 4, "fusion"), (64, 3, "fusion"), (190, 3, "model.image"), (100, 8, "model.image")])
def test_dim_not_divisible_by_heads(params_dict, dim, heads, key):
    _set(params_dict, f"{key}.dim", dim)
    _set(params_dict, f"{key}.heads", heads)
    with pytest.raises(ConfigError, match=rf"{key}\.dim: {dim} is not divisible by {key}\.heads={heads}"):
        config_from_dict(params_dict)


def test_image_smaller_than_a_patch(params_dict):
    _set(params_dict, "model.image.height", 8)
    with pytest.raises(ConfigError, match="smaller than one patch"):
        config_from_dict(params_dict)


# Gaps found by the fault sweep, now refused by dmf_core/config.py before any work (they used to
# fail only later, in the generator, the augmentation or the optimiser).
UNCHECKED = [("synth.height", -8), ("synth.width", 0), ("synth.synthped.ids", -3),
             ("synth.synthped.images_per_id", 0), ("synth.sp_market.train_ids", -1), ("augment.pad", -4),
             ("pretrain.grad_clip", -1.0), ("loss.triplet_margin", -0.3), ("loss.id_weight", -1.0),
             ("augment.std", [0.5, 0.0, 0.5])]


@pytest.mark.parametrize(("key", "value"), UNCHECKED, ids=[f"{k}={v}" for k, v in UNCHECKED])
def test_late_failing_sizes_are_refused(params_dict, key, value):
    _set(params_dict, key, value)
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        config_from_dict(params_dict)


# NaN compares false with everything, so it passed every range check above; an infinity is never
# a meaningful size, rate or weight. Both are refused anywhere, naming the key.
NON_FINITE = [("pretrain.lr", float("nan")), ("finetune.weight_decay", float("inf")),
              ("augment.flip", float("nan")), ("loss.triplet_margin", float("-inf")),
              ("fusion.mlp_ratio", float("inf")), ("pretrain.grad_clip", float("nan")),
              ("model.image.depth", float("inf")), ("synth.height", float("nan"))]


@pytest.mark.parametrize(("key", "value"), NON_FINITE, ids=[f"{k}={v}" for k, v in NON_FINITE])
def test_nan_and_infinity_are_refused_naming_the_key(params_dict, key, value):
    _set(params_dict, key, value)
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}: expected a finite number, got -?(nan|inf)"):
        config_from_dict(params_dict)


@pytest.mark.parametrize("where", ["augment.mean", "viewpoint"])
def test_nan_inside_lists_names_the_element(params_dict, where):
    if where == "augment.mean":
        params_dict["augment"]["mean"][1] = float("nan")
        key = r"augment\.mean\[1\]"
    else:
        params_dict["captions"]["viewpoint_words"]["front"][0] = float("inf")
        key = r"captions\.viewpoint_words\.front\[0\]"
    with pytest.raises(ConfigError, match=rf"^{key}: expected a finite number"):
        config_from_dict(params_dict)


# --------------------------------------------------------------------------------------------- source: dir


def _dir_dataset(params: dict, location: str) -> None:
    params["datasets"]["market1501"] = {"layout": "market", "source": "dir", "location": location}


@pytest.fixture()
def project(tmp_path):
    """A project root with data/raw/market1501 already holding the user's images."""
    (tmp_path / "data" / "raw" / "market1501").mkdir(parents=True)
    (tmp_path / "data" / "extracted" / "market1501").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link_to_raw").symlink_to(tmp_path / "data" / "raw" / "market1501")
    return tmp_path


@pytest.mark.parametrize("location", [
    "data/raw/market1501", "data/raw/market1501/", "./data/raw/other", "data/extracted/../raw/market1501",
    "link_to_raw", "link_to_raw/bounding_box_train", "elsewhere/../data/raw", "{root}/data/raw/market1501",
])
def test_dir_source_inside_data_raw_is_refused(params_dict, project, location):
    """DVC deletes data/raw/<name>/ before the download stage runs: the data would be lost."""
    _dir_dataset(params_dict, location.format(root=project))
    with pytest.raises(ConfigError) as err:
        config_from_dict(params_dict, root=project)
    msg = str(err.value)
    assert msg.startswith("datasets.market1501.location: ") and "inside data/raw/" in msg
    assert "DVC deletes it" in msg and "data/extracted/market1501/" in msg and "outside the project" in msg


@pytest.mark.parametrize("location", [".", "data", "{root}"])
def test_dir_source_containing_data_raw_is_refused(params_dict, project, location):
    _dir_dataset(params_dict, location.format(root=project))
    with pytest.raises(ConfigError, match=r"which contains data/raw/"):
        config_from_dict(params_dict, root=project)


def test_dir_source_relative_to_the_working_directory_by_default(params_dict, project, monkeypatch):
    _dir_dataset(params_dict, "data/raw/market1501")
    monkeypatch.chdir(project)
    with pytest.raises(ConfigError, match="inside data/raw/"):
        config_from_dict(params_dict)
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(params_dict))
    with pytest.raises(ConfigError, match=r"params\.yaml: datasets\.market1501\.location: .*inside data/raw/"):
        load_config(path)


def test_dir_source_through_a_symlinked_data_folder_is_refused(params_dict, tmp_path):
    """data/ on another disk (a symlink): the same folder reached by its real path is refused."""
    real = tmp_path / "big_disk" / "data"
    (real / "raw" / "market1501").mkdir(parents=True)
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "data").symlink_to(real)
    _dir_dataset(params_dict, str(real / "raw" / "market1501"))
    with pytest.raises(ConfigError, match="inside data/raw/"):
        config_from_dict(params_dict, root=tmp_path / "proj")


@pytest.mark.parametrize("location", ["data/extracted/market1501", "elsewhere", "data/raw_backup/m",
                                      "{root}/elsewhere", "data/archives/market1501"])
def test_dir_source_outside_data_raw_is_accepted(params_dict, project, location):
    _dir_dataset(params_dict, location.format(root=project))
    cfg = config_from_dict(params_dict, root=project)
    assert cfg.datasets["market1501"].source == "dir"


def test_data_raw_is_fine_for_other_sources(params_dict, project):
    params_dict["datasets"]["market1501"] = {"layout": "market", "source": "archive",
                                             "location": "data/raw/market1501.zip"}
    config_from_dict(params_dict, root=project)


# --------------------------------------------------------------------------------------------- make paper


@pytest.fixture()
def paper_project(tmp_path, monkeypatch):
    """The Makefile and both profiles in a temp copy; `date` pinned so two runs share a stamp."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    (tmp_path / "configs").mkdir()
    for name in ("Makefile", "params.yaml", "configs/paper.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "date").write_text("#!/bin/sh\necho 20250101-120000\n")
    (fake / "date").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def _make_paper(cwd: Path) -> str:
    proc = subprocess.run(["make", "-s", "paper"], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_make_paper_keeps_every_replaced_params_yaml(paper_project):
    demo = (paper_project / "params.yaml").read_text()
    paper = (paper_project / "configs" / "paper.yaml").read_text()
    out = _make_paper(paper_project)
    first = paper_project / "params.yaml.bak-20250101-120000"
    assert first.read_text() == demo and (paper_project / "params.yaml").read_text() == paper
    assert "params.yaml.bak-20250101-120000" in out and "restore" in out

    assert "saved" not in _make_paper(paper_project)  # already the paper profile: nothing to keep
    assert sorted(p.name for p in paper_project.glob("params.yaml.bak-*")) == [first.name]

    for n, edit in enumerate(["seed: 1\n", "seed: 2\n"], start=1):  # same second: never overwritten
        (paper_project / "params.yaml").write_text(edit)
        out = _make_paper(paper_project)
        again = paper_project / f"params.yaml.bak-20250101-120000-{n}"
        assert again.read_text() == edit and again.name in out
    assert first.read_text() == demo


def test_make_paper_without_params_yaml(paper_project):
    (paper_project / "params.yaml").unlink()
    assert "saved" not in _make_paper(paper_project)
    assert not list(paper_project.glob("params.yaml.bak-*"))
    assert (paper_project / "params.yaml").read_text() == (paper_project / "configs" / "paper.yaml").read_text()


def test_make_paper_dry_run_names_the_backup():
    proc = subprocess.run(["make", "-n", "paper"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "params.yaml.bak-" in proc.stdout and "cp configs/paper.yaml params.yaml" in proc.stdout


def test_make_profile_switches_to_a_dg_protocol_and_refuses_an_unknown_one(paper_project):
    shutil.copy(ROOT / "configs" / "protocol3.yaml", paper_project / "configs" / "protocol3.yaml")
    make = ["make", "-s", "profile"]
    proc = subprocess.run([*make, "P=protocol3"], cwd=paper_project, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    protocol3 = (paper_project / "configs" / "protocol3.yaml").read_text()
    assert (paper_project / "params.yaml").read_text() == protocol3
    proc = subprocess.run([*make, "P=nope"], cwd=paper_project, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "no configs/nope.yaml" in proc.stderr and "protocol3" in proc.stderr
    assert (paper_project / "params.yaml").read_text() == protocol3  # nothing replaced
