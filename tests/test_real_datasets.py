"""Real datasets as their owners have them (issue 15): the download and captions stages, `dmf
doctor` and `dmf datasets` on generated trees in the real layouts, zipped as the real archives are."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from _archives import build_cuhk03np, build_finegpr, build_market, make_zip

from dmf_core import cli
from dmf_core.config import load_config
from dmf_core.data.sources.fetch import ChecksumError, read_lock
from dmf_core.data.sources.manifest import StatisticsError
from dmf_core.data.sources.registry import ATTRIBUTES_PATH, REGISTRY
from dmf_core.runtime import StageError

ROOT = Path(__file__).resolve().parents[1]
MARKET_ZIP = "Market-1501-v15.09.15.zip"


def _stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def project(tmp_path, monkeypatch, params_dict):
    """A project folder holding the default params plus ``market1501`` from a local archive."""
    params_dict["datasets"]["market1501"] = {"layout": "market", "source": "archive", "registry": "market1501",
                                             "location": f"data/archives/{MARKET_ZIP}"}
    monkeypatch.chdir(tmp_path)

    def write(params: dict = params_dict):
        Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        return load_config("params.yaml")

    write()
    return {"root": tmp_path, "params": params_dict, "write": write}


def _official_counts(monkeypatch, key: str, stats: dict) -> None:
    """Make the registry's official counts those of the generated tree (a scaled-down real copy)."""
    monkeypatch.setitem(REGISTRY, key, dataclasses.replace(REGISTRY[key], statistics=stats))


def _market_archive(src: Path, *, drop: int = 0, extra: bool = False) -> Path:
    """Market-1501 zipped as the real archive; ``drop`` query images missing (an incomplete copy)."""
    shutil.rmtree(src, ignore_errors=True)
    stats = build_market(src, train_ids=4, test_ids=4)
    for path in sorted((src / "Market-1501-v15.09.15" / "query").iterdir())[:drop]:
        path.unlink()
    if extra:
        (src / "Market-1501-v15.09.15" / "readme.txt").write_text("a re-packed copy")
    make_zip(src, Path("data/archives") / MARKET_ZIP)
    return stats


# ---------------------------------------------------------------------------------------------
# 1, 2: the attribute file is a DVC dependency, at one place outside data/raw/
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["params.yaml", "configs/paper.yaml"])
def test_attribute_file_is_a_captions_dependency(tmp_path, monkeypatch, profile):
    from dvc.repo import Repo

    monkeypatch.chdir(tmp_path)  # DVC reads params.yaml from the working directory
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(ROOT / profile, tmp_path / "params.yaml")
    (tmp_path / ".dvc").mkdir()  # what `dvc init` makes, without its logging
    (tmp_path / ".dvc" / "config").write_text("")
    with Repo(str(tmp_path)) as repo:
        (stage,) = repo.stage.collect("captions")
        deps = {Path(d.def_path).as_posix() for d in stage.deps}
    attributes = yaml.safe_load((ROOT / profile).read_text())["captions"]["file"]
    assert attributes in deps
    if profile == "configs/paper.yaml":  # a file the user converts, never inside a stage's output
        assert attributes == ATTRIBUTES_PATH and not attributes.startswith("data/raw/")


def test_attribute_path_is_the_same_everywhere(project):
    stale = "data/raw/<name>/attributes.csv"
    for text in ((ROOT / "docs" / "datasets.md").read_text(), (ROOT / "docs" / "captions.md").read_text(),
                 REGISTRY["finegpr"].note, REGISTRY["finegpr"].how_to_get()):
        assert stale not in text
    assert ATTRIBUTES_PATH in REGISTRY["finegpr"].note and ATTRIBUTES_PATH in (ROOT / "docs/datasets.md").read_text()
    # an attribute file kept inside a real dataset's data/raw/<name>/ is refused before any work
    from dmf_core.checks import attributes_requirement

    params = project["params"]
    params["datasets"]["finegpr"] = {"layout": "finegpr", "source": "archive", "location": "data/archives/F.zip"}
    params["captions"].update(dataset="finegpr", file="data/raw/finegpr/attributes.csv")
    Path("data/raw/finegpr").mkdir(parents=True)
    Path("data/raw/finegpr/attributes.csv").write_text("pid\n")
    need = attributes_requirement(project["write"](params), Path("."))
    assert not need.ok and "dvc repro` deletes" in need.detail and ATTRIBUTES_PATH in need.detail


# ---------------------------------------------------------------------------------------------
# 4: an archive's hash is recorded only once verified; a stale hash says where it came from
# ---------------------------------------------------------------------------------------------


def test_failed_run_records_no_hash_and_a_replaced_archive_can_be_forgotten(project, monkeypatch, capsys):
    download = _stage("download")
    cfg = project["write"]()
    complete = _market_archive(Path("src"), drop=2)  # the incomplete archive is in place
    _official_counts(monkeypatch, "market1501", complete)
    with pytest.raises(StatisticsError, match="read from folder Market-1501-v15.09.15"):
        download.main(cfg, "market1501")
    assert "market1501" not in read_lock("data/checksums.json")

    _market_archive(Path("src"))  # the user puts the complete archive in its place
    download.main(cfg, "market1501")
    record = read_lock("data/checksums.json")["market1501"]
    assert record["file"] == MARKET_ZIP and record["recorded_by"].startswith("download@market1501 on ")
    assert record["recorded_at"].startswith("20")
    report = json.loads(Path("reports/stats/datasets/market1501.json").read_text())
    assert report["folder"] == "Market-1501-v15.09.15" and report["official_statistics"] == "match"

    _market_archive(Path("src"), extra=True)  # other bytes, same images: refused, with where the hash came from
    with pytest.raises(ChecksumError) as err:
        download.main(cfg, "market1501")
    message = str(err.value)
    assert record["recorded_at"] in message and "download@market1501" in message
    assert "dmf datasets --forget market1501" in message and "corrupt" not in message

    assert cli.main(["datasets", "--forget", "market1501"]) == 0
    assert "forgot sha256" in capsys.readouterr().out
    assert "market1501" not in read_lock("data/checksums.json")
    download.main(cfg, "market1501")  # verified again and recorded anew
    assert read_lock("data/checksums.json")["market1501"]["sha256"] != record["sha256"]
    assert cli.main(["datasets", "--forget", "nope"]) == 1
    assert "no hash recorded for 'nope'" in capsys.readouterr().err


def test_partial_copy_is_not_recorded_and_is_marked(project, monkeypatch, capsys):
    params = project["params"]
    params["datasets"]["market1501"]["allow_partial"] = True
    cfg = project["write"](params)
    _official_counts(monkeypatch, "market1501", _market_archive(Path("src"), drop=1))
    _stage("download").main(cfg, "market1501")
    assert "market1501" not in read_lock("data/checksums.json")
    assert cli.main(["datasets", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["market1501"]["partial"] and rows["market1501"]["state"] == "extracted"
    assert not rows["sp_market"]["partial"]
    cli.main(["datasets"])
    assert "extracted (allow_partial)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# 5: data/checksums.json can be committed
# ---------------------------------------------------------------------------------------------


def test_checksums_file_is_not_git_ignored(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "-C", str(tmp_path), "check-ignore", "-q", path]).returncode == 0

    assert not ignored("data/checksums.json")
    assert ignored("data/archives/FineGPR.zip") and ignored("data/raw/market1501/x.jpg")
    assert ignored(f"data/{ATTRIBUTES_PATH.split('/', 1)[1]}")  # the converted FineGPR annotation stays local
    assert ignored("data/.checksums.json.lock")


# ---------------------------------------------------------------------------------------------
# 6: a folder holding another dataset is refused, not silently parsed
# ---------------------------------------------------------------------------------------------


def test_dir_source_with_market_and_cuhk03np_is_refused(project):
    params = project["params"]
    mixed = Path("data/extracted/mixed")
    build_market(mixed)
    build_cuhk03np(mixed)
    params["datasets"]["market1501"] = {"layout": "market", "source": "dir", "registry": "market1501",
                                        "location": str(mixed)}
    with pytest.raises(ValueError, match="ambiguous") as err:
        _stage("download").main(project["write"](params), "market1501")
    for candidate in ("Market-1501-v15.09.15", "cuhk03-np/detected", "cuhk03-np/labeled"):
        assert candidate in str(err.value)
    assert not Path("data/manifests/market1501.parquet").exists()


# ---------------------------------------------------------------------------------------------
# 7: the bad-images report has one place
# ---------------------------------------------------------------------------------------------


def test_bad_images_report_next_to_the_statistics(project, monkeypatch):
    src = Path("src")
    stats = build_market(src, train_ids=4, test_ids=4)
    victim = sorted((src / "Market-1501-v15.09.15" / "query").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated JPEG
    make_zip(src, Path("data/archives") / MARKET_ZIP)
    _official_counts(monkeypatch, "market1501", stats)
    _stage("download").main(project["write"](), "market1501")
    report = Path("reports/stats/datasets/market1501.bad_images.txt")
    assert report.read_text().startswith(f"Market-1501-v15.09.15/query/{victim.name}\t")
    assert not Path("data/raw/market1501/bad_images.txt").exists()
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in dvc["stages"]["download"]["do"]["outs"]]
    assert "reports/stats/datasets/${key}.bad_images.txt" in outs
    assert "reports/stats/datasets/<name>.bad_images.txt" in (ROOT / "docs" / "datasets.md").read_text()


# ---------------------------------------------------------------------------------------------
# 8, 9: doctor checks what the params need; the first stage refuses to start long work
# ---------------------------------------------------------------------------------------------


def _paper_needs(params: dict) -> dict:
    params["model"]["text"]["name"] = "bert-base-uncased"
    params["model"]["image"]["pretrained"] = "data/archives/jx_vit_base_p16_224-80ecf9dd.pth"
    return params


def _fake_hub_cache(cache: Path, repo_id: str) -> None:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"hidden_size": 768}')
    (snapshot / "model.safetensors").write_bytes(b"weights")


def test_doctor_checks_the_params(project, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(project["root"] / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    project["write"](_paper_needs(project["params"]))
    rc = cli.main(["doctor"])
    out = capsys.readouterr().out
    assert rc == 1
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "MISSING" in lines["text encoder (model.text.name: bert-base-uncased)"]
    assert "Text encoder offline" in lines["text encoder (model.text.name: bert-base-uncased)"]
    assert "MISSING" in lines["ViT weights (model.image.pretrained)"]
    assert "MISSING" in lines["datasets.market1501 (archive)"]
    assert "written by download@synthped" in lines["attribute file (captions.file: "
                                                   "data/raw/synthped/attributes.csv)"]

    _fake_hub_cache(project["root"] / "hf", "bert-base-uncased")
    Path("data/archives").mkdir(parents=True)
    Path("data/archives/jx_vit_base_p16_224-80ecf9dd.pth").write_bytes(b"w" * 10)
    Path("data/archives", MARKET_ZIP).write_bytes(b"z")
    rc = cli.main(["doctor"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "cached hub model at" in out and "MISSING" not in out

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    params = project["params"]
    params["model"]["text"]["name"] = "someone/not-cached"
    project["write"](params)
    assert cli.main(["doctor"]) == 0  # online, it may still download: a warning, not a failure
    assert "WARNING: hub id not in the Hugging Face cache" in capsys.readouterr().out


def test_local_text_encoder_folder(tmp_path):
    from dmf_core.checks import text_encoder_requirement

    folder = tmp_path / "bert-base-uncased"
    assert not text_encoder_requirement(str(folder)).ok
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    need = text_encoder_requirement(str(folder))
    assert need.ok and str(folder) in need.detail


def test_first_stage_refuses_before_the_long_work(project, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(project["root"] / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = project["write"](_paper_needs(project["params"]))
    with pytest.raises(StageError) as err:
        _stage("download").main(cfg, "synthped")
    message = str(err.value)
    assert "\n" not in message
    assert "bert-base-uncased" in message and "jx_vit_base_p16_224-80ecf9dd.pth" in message
    assert f"data/archives/{MARKET_ZIP} not found" in message
    assert not Path("data/raw/synthped").exists()  # nothing rendered, extracted or packed


# ---------------------------------------------------------------------------------------------
# 10: `dmf datasets` lists the attribute file and the weights, and knows labeled/
# ---------------------------------------------------------------------------------------------


def test_datasets_lists_attributes_weights_and_missing_labeled(project, capsys):
    params = _paper_needs(project["params"])
    params["datasets"]["cuhk03np_labeled"] = {"layout": "cuhk03np", "source": "archive",
                                              "registry": "cuhk03np_labeled", "location": "data/archives/cuhk03-np.zip"}
    params["datasets"]["finegpr"] = {"layout": "finegpr", "source": "archive", "registry": "finegpr",
                                     "location": "data/archives/FineGPR.zip"}
    params["captions"].update(dataset="finegpr", file=ATTRIBUTES_PATH)
    project["write"](params)
    src = Path("src")
    build_cuhk03np(src)
    shutil.rmtree(src / "cuhk03-np" / "labeled")  # a release with detected/ only
    make_zip(src, Path("data/archives/cuhk03-np.zip"))

    assert cli.main(["datasets", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert "no labeled/ folder" in rows["cuhk03np_labeled"]["next_step"]
    attributes = rows["captions.file"]
    assert attributes["kind"] == "file" and attributes["state"] == "missing"
    assert "convert it" in attributes["next_step"] and attributes["source"] == ATTRIBUTES_PATH
    weights = rows["vit_base_jx"]
    assert weights["state"] == "missing" and weights["origin"] == "params+registry"
    assert "not found" in weights["next_step"]

    Path(ATTRIBUTES_PATH).write_text("pid\n")
    Path("data/archives/jx_vit_base_p16_224-80ecf9dd.pth").write_bytes(b"w")
    build_cuhk03np(Path("complete"))
    make_zip(Path("complete"), Path("data/archives/cuhk03-np.zip"))
    cli.main(["datasets", "--json"])
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["captions.file"]["state"] == "present"
    assert rows["vit_base_jx"]["state"] == "present" and rows["vit_base_jx"]["next_step"].startswith("ready")
    assert "download@cuhk03np_labeled" in rows["cuhk03np_labeled"]["next_step"]


# ---------------------------------------------------------------------------------------------
# 3: a missing attribute file says what it is, through the captions stage
# ---------------------------------------------------------------------------------------------


def test_captions_stage_missing_attribute_file(project):
    params = project["params"]
    params["datasets"]["finegpr"] = {"layout": "finegpr", "source": "dir", "location": "data/extracted/finegpr",
                                     "allow_partial": True}
    params["captions"].update(dataset="finegpr", file=ATTRIBUTES_PATH)
    del params["datasets"]["market1501"]
    cfg = project["write"](params)
    build_finegpr(Path("data/extracted/finegpr"))
    download, captions = _stage("download"), _stage("captions")

    def says_what_the_file_is(err) -> None:
        message = str(err.value)
        assert ATTRIBUTES_PATH in message and "pid,gender,hair" in message and "docs/captions.md" in message
        assert "FineGPR's own attribute annotation is not in this format" in message

    with pytest.raises(StageError) as err:  # the first stage already knows
        download.main(cfg, "finegpr")
    says_what_the_file_is(err)
    Path(ATTRIBUTES_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(ATTRIBUTES_PATH).write_text("pid\n")
    download.main(cfg, "finegpr")
    Path(ATTRIBUTES_PATH).unlink()
    with pytest.raises(StageError) as err:  # and captions, run on its own, says the same
        captions.main(cfg)
    says_what_the_file_is(err)
