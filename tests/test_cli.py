"""The `dmf` command: help everywhere, one-line errors, search/extract on a real (tiny) model and
packed split, dataset states, the captioned sample sheet."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dmf_core import cli
from dmf_core.config import config_from_dict
from dmf_core.model import pretrained
from dmf_core.model.build import build_model

SUBCOMMANDS = ["search", "explain", "extract", "export", "datasets", "doctor", "matrix", "showcase"]


# ---------------------------------------------------------------------------------------------
# Fixtures: a tiny model and a tiny packed gallery
# ---------------------------------------------------------------------------------------------


def _person(rng: np.random.Generator, pid: int, h: int = 48, w: int = 24) -> Image.Image:
    """A coloured block figure whose colours depend on the id (plus noise): separable by id."""
    base = np.random.default_rng(pid).integers(0, 255, size=(2, 3))
    arr = np.empty((h, w, 3), dtype=np.float64)
    arr[: h // 2], arr[h // 2:] = base[0], base[1]
    arr += rng.normal(0, 12, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """models/m (image-only tiny DMF model), a packed gallery, a folder of query images."""
    import copy

    import yaml

    from dmf_core.data.store.lmdb_store import pack_split

    root = tmp_path_factory.mktemp("cli")
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params = copy.deepcopy(params)
    params["model"]["image"].update(depth=1, dim=32, heads=2, height=32, width=16, patch=8, stride=8)
    params["fusion"].update(dim=32, layers=1, heads=2, mode="image_only")
    cfg = config_from_dict(params)
    torch.manual_seed(0)
    model = build_model(cfg, 5, with_text=False, pretrained=False).eval()
    pretrained.save_model(model, root / "model", cfg=cfg, num_classes=5, stage="finetune")

    rng = np.random.default_rng(0)
    raw = root / "raw"
    raw.mkdir()
    rows = []
    for pid in range(1, 7):
        for j in range(3):
            name = f"{pid:04d}_c{j + 1}s1_{j:06d}_00.jpg"
            _person(rng, pid).save(raw / name, quality=95)
            rows.append({"image_id": name, "pid": pid, "camid": j})
    gallery = root / "lmdb" / "toy" / "toy-gallery.lmdb"
    pack_split(pd.DataFrame(rows), raw, gallery)
    queries = root / "queries"
    (queries / "sub").mkdir(parents=True)
    for pid in (2, 5):
        _person(rng, pid).save(queries / f"q{pid}.png")
    _person(rng, 3).save(queries / "sub" / "q3.jpg")
    (queries / "notes.txt").write_text("not an image")
    return {"root": root, "model": root / "model", "gallery": gallery, "queries": queries, "raw": raw, "cfg": cfg}


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---------------------------------------------------------------------------------------------
# Help and errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_on_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dmf {command}") and len(out.splitlines()) > 3


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in SUBCOMMANDS:
        assert f"dmf {command}" in out


def test_error_is_one_line_without_traceback_and_debug_raises(world, tmp_path, capsys):
    argv = ["search", str(world["queries"]), "--model", str(tmp_path / "no_model"),
            "--gallery", str(world["gallery"])]
    rc, out, err = _run(argv, capsys)
    assert rc == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("dmf search: error: ") and "no_model" in err
    with pytest.raises(FileNotFoundError, match="no_model"):
        cli.main(["--debug", *argv])


def test_console_script_exit_code_and_stderr(tmp_path):
    """The installed entry point, as a user runs it: non-zero exit, one line, no traceback."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "dmf_core.cli", "extract", str(tmp_path / "nothing.lmdb"),
                           "--model", str(tmp_path), "--out", str(tmp_path / "f")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("dmf extract: error:") and proc.stderr.count("\n") == 1
    bad = subprocess.run([sys.executable, "-m", "dmf_core.cli", "search", "x", "-k", "0"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert bad.returncode == 2 and "positive integer" in bad.stderr


# ---------------------------------------------------------------------------------------------
# extract and search
# ---------------------------------------------------------------------------------------------


def test_extract_split_and_folder(world, tmp_path, capsys):
    from dmf_core.search import read_features

    rc, out, err = _run(["extract", str(world["gallery"]), "--model", str(world["model"]),
                         "--out", str(tmp_path / "g.npy"), "--batch-size", "4"], capsys)
    assert rc == 0, err
    feats, ids, info = read_features(tmp_path / "g")
    assert feats.shape == (18, 32) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    assert list(ids.columns) == ["key", "image_id", "pid", "camid"] and ids["key"].iloc[0] == "00000000"
    assert info["model"] == str(world["model"]) and info["flip"] is False and info["dim"] == 32

    # The same features as the evaluation stage computes (its loader, transform and feature
    # function; batches change nothing).
    from dmf_core.data.loading.loader import build_test_loader
    from dmf_core.eval.features import extract_features

    model, _ = pretrained.load_model(world["model"])
    loader = build_test_loader(world["gallery"], world["cfg"].augment, 32, 16, batch_size=7)
    np.testing.assert_allclose(feats, extract_features(model.embed_images, loader), atol=1e-5)

    rc, _, err = _run(["extract", str(world["queries"]), "--model", str(world["model"]),
                       "--out", str(tmp_path / "q"), "--flip"], capsys)
    assert rc == 0, err
    qf, qids, qinfo = read_features(tmp_path / "q")
    assert [Path(p).name for p in qids["path"]] == ["q2.png", "q5.png", "q3.jpg"]  # sorted, recursive
    assert qf.shape == (3, 32) and qinfo["flip"] is True


def test_search_writes_json_and_png_matching_brute_force(world, tmp_path, capsys):
    from dmf_core.search import read_features

    out_dir = tmp_path / "search"
    rc, out, err = _run(["search", str(world["queries"]), "--model", str(world["model"]),
                         "--gallery", str(world["gallery"]), "-k", "5", "--out", str(out_dir)], capsys)
    assert rc == 0, err
    assert "search.json" in out
    record = json.loads((out_dir / "search.json").read_text())
    assert record["k"] == 5 and len(record["queries"]) == 3
    with Image.open(out_dir / "search.png") as im:
        assert im.width > 300 and im.height > 200

    # faiss top-k equals a brute-force cosine ranking of the same features
    _run(["extract", str(world["gallery"]), "--model", str(world["model"]), "--out", str(tmp_path / "g")], capsys)
    _run(["extract", str(world["queries"]), "--model", str(world["model"]), "--out", str(tmp_path / "q")], capsys)
    g, gids, _ = read_features(tmp_path / "g")
    q, _, _ = read_features(tmp_path / "q")
    dist = 1.0 - q @ g.T
    for qi, entry in enumerate(record["queries"]):
        order = np.argsort(dist[qi], kind="stable")[:5]
        assert [m["image_id"] for m in entry["matches"]] == gids["image_id"].iloc[order].tolist()
        np.testing.assert_allclose([m["distance"] for m in entry["matches"]], dist[qi, order], atol=1e-4)
        assert [m["rank"] for m in entry["matches"]] == [1, 2, 3, 4, 5]

    # reusing extracted gallery features gives the same answer; a mismatching file is refused
    rc, _, err = _run(["search", str(world["queries"]), "--model", str(world["model"]), "--gallery",
                       str(world["gallery"]), "-k", "5", "--out", str(tmp_path / "s2"),
                       "--gallery-features", str(tmp_path / "g.npy")], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "s2" / "search.json").read_text())["queries"] == record["queries"]
    rc, _, err = _run(["search", str(world["queries"]), "--model", str(world["model"]), "--gallery",
                       str(world["gallery"]), "--out", str(tmp_path / "s3"),
                       "--gallery-features", str(tmp_path / "q.npy")], capsys)
    assert rc == 1 and "not the images of" in err


def test_search_k_larger_than_gallery_and_bad_image(world, tmp_path, capsys):
    rc, _, err = _run(["search", str(world["queries"] / "q2.png"), "--model", str(world["model"]),
                       "--gallery", str(world["gallery"]), "-k", "100", "--out", str(tmp_path / "s")], capsys)
    assert rc == 0, err
    assert len(json.loads((tmp_path / "s" / "search.json").read_text())["queries"][0]["matches"]) == 18
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    rc, _, err = _run(["search", str(bad), "--model", str(world["model"]), "--gallery", str(world["gallery"]),
                       "--out", str(tmp_path / "s4")], capsys)
    assert rc == 1 and "bad.jpg: not a readable image" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------


def _write_params(root: Path, params: dict) -> None:
    import yaml

    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_datasets_states(params_dict, tmp_path, monkeypatch, capsys):
    from dmf_core.data.sources.manifest import write_manifest

    params_dict["datasets"] = {
        "sp_market": {"layout": "market", "source": "synth"},
        "market1501": {"layout": "market", "source": "archive", "registry": "market1501",
                       "location": "data/archives/Market-1501-v15.09.15.zip"},
        "cuhk03np": {"layout": "cuhk03np", "source": "archive", "registry": "cuhk03np_detected",
                     "location": "data/archives/cuhk03-np.zip"},
    }
    params_dict["finetune"]["sources"] = ["sp_market"]
    params_dict["evaluate"]["rows"] = ["pretrain", "sp_market"]
    params_dict["evaluate"]["targets"] = ["sp_market"]
    params_dict["pretrain"]["dataset"] = "sp_market"
    params_dict["captions"]["dataset"] = "sp_market"
    _write_params(tmp_path, params_dict)
    monkeypatch.chdir(tmp_path)
    archives = tmp_path / "data" / "archives"
    archives.mkdir(parents=True)
    (archives / "Market-1501-v15.09.15.zip").write_bytes(b"x" * 1000)  # present, not verified
    (archives / "cuhk03-np.zip").write_bytes(b"y" * 2000)
    (tmp_path / "data" / "checksums.json").write_text(json.dumps(
        {"cuhk03np": {"file": "cuhk03-np.zip", "sha256": "ab" * 32, "size": 2000, "source": "archive"}}))
    # sp_market: extracted and packed (both splits present)
    (tmp_path / "data" / "raw" / "sp_market").mkdir(parents=True)
    manifest = pd.DataFrame({"image_id": ["a.jpg", "b.jpg"], "split": ["train", "query"], "pid": [1, 1],
                             "camid": [0, 1], "dataset": ["sp_market"] * 2})
    write_manifest(manifest, tmp_path / "data" / "manifests" / "sp_market.parquet")
    lmdb_dir = tmp_path / "data" / "lmdb" / "sp_market"
    lmdb_dir.mkdir(parents=True)
    (lmdb_dir / "sp_market-train.lmdb").write_bytes(b"\0" * 4096)

    rc, out, err = _run(["datasets", "--json"], capsys)
    assert rc == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["sp_market"]["state"] == "extracted"  # query split not packed yet
    assert rows["sp_market"]["next_step"] == "dvc repro pack@sp_market"
    (lmdb_dir / "sp_market-query.lmdb").write_bytes(b"\0" * 4096)
    rows = {r["name"]: r for r in json.loads(_run(["datasets", "--json"], capsys)[1])}
    assert rows["sp_market"]["state"] == "packed" and rows["sp_market"]["size_bytes"] == 8192
    assert rows["market1501"]["state"] == "archive present" and rows["market1501"]["size_bytes"] == 1000
    assert "download@market1501" in rows["market1501"]["next_step"]
    assert rows["cuhk03np"]["state"] == "verified" and rows["cuhk03np"]["registry"] == "cuhk03np_detected"
    # registry entries not in params are listed once, with how to get them
    assert "cuhk03np_detected" not in rows and "market1501" in rows
    assert rows["msmt17_v1"]["origin"] == "registry" and rows["msmt17_v1"]["state"] == "missing"
    assert "e-mail" in rows["msmt17_v1"]["how_to_get"] and "datasets.msmt17_v1" in rows["msmt17_v1"]["next_step"]
    assert rows["vit_base_jx"]["kind"] == "weights"

    rc, out, _ = _run(["datasets", "--verbose"], capsys)
    assert rc == 0
    assert out.splitlines()[0].split()[:4] == ["dataset", "kind", "in", "state"]
    assert "How to get them:" in out and "- msmt17_v1: MSMT17" in out

    (tmp_path / "params.yaml").write_text("datasets: [oops]\n")
    rc, _, err = _run(["datasets"], capsys)
    assert rc == 1 and "params.yaml" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# doctor, matrix, showcase
# ---------------------------------------------------------------------------------------------


def test_doctor_reports_the_essentials(params_dict, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = _run(["doctor"], capsys)
    assert rc == 0
    keys = {line.split("  ")[0].strip() for line in out.splitlines()}
    for key in ("torch", "cuda available", "free disk (data/)", "params", "git repository",
                "dvc initialised", "dvc remote"):
        assert key in keys, out
    assert "no: run `dvc init`" in out and "params.yaml not found" in out
    _write_params(tmp_path, params_dict)  # the demo profile: everything it needs is here or generated
    rc, out, _ = _run(["doctor"], capsys)
    assert rc == 0, out
    assert re.search(r"text encoder \(model.text.name: minilm\) +present offline", out) and "MISSING" not in out


def test_matrix_without_a_run_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, _, err = _run(["matrix"], capsys)
    assert rc == 1 and "eval_matrix.md not found" in err and "dvc repro" in err


def test_showcase_renders_captioned_sheet(tmp_path, monkeypatch, capsys):
    from dmf_core.data.sources.layouts import parse_layout
    from dmf_core.data.sources.manifest import write_manifest
    from dmf_core.data.synthped import world as synth

    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "data" / "raw" / "synthped"
    synth.write_finegpr(raw, ids=4, images_per_id=2, height=64, width=32, seed=0, namespace="synthped")
    manifest = parse_layout("finegpr", raw, "synthped")
    write_manifest(manifest, tmp_path / "data" / "manifests" / "synthped.parquet")
    captions = pd.DataFrame({"image_id": manifest["image_id"], "caption_idx": 0,
                             "caption": [f"A person with id {p} walking past a long wall in soft light."
                                         for p in manifest["pid"]]})
    (tmp_path / "data" / "captions").mkdir(parents=True)
    captions.to_parquet(tmp_path / "data" / "captions" / "finegpr.parquet")
    out_png = tmp_path / "docs" / "img" / "captions_sample.png"
    rc, out, err = _run(["showcase", "--out", str(out_png), "--num", "3"], capsys)
    assert rc == 0, err
    with Image.open(out_png) as im:
        assert im.width > 3 * 150 and im.height > 250
    # one image per identity, deterministic
    from dmf_core.showcase import pick_samples

    picks = pick_samples(manifest, captions, 3, seed=0)
    assert picks["pid"].nunique() == 3
    assert picks.equals(pick_samples(manifest, captions, 3, seed=0))


def test_showcase_without_captions_says_which_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, _, err = _run(["showcase"], capsys)
    assert rc == 1 and "dvc repro download@synthped" in err
