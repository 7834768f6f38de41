"""Your own images (issue 27): ``layout: csv``, a folder with ``dataset.csv`` beside the images.

A good CSV gives a deterministic manifest (string ids mapped to 0..n-1, captions carried) that
packs; every bad row stops the download stage with one line naming the CSV, the line and the
value, before it writes data/raw/, the manifest or any report.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from dmf_core import paths
from dmf_core.config import ConfigError, load_config
from dmf_core.data.sources.layouts import parse_layout
from dmf_core.data.sources.manifest import read_manifest
from dmf_core.data.store.lmdb_store import sidecar_path
from dmf_core.runtime import run_stage

ROOT = Path(__file__).resolve().parents[1]
FOLDER = Path("own/mine")
CSV = FOLDER / "dataset.csv"
# a caption over two lines and a blank line, so a row's line is not its record number + 1
GOOD_CSV = """path,pid,camid,split,caption
imgs/alice_1.jpg,alice,north,train,"a woman in a red coat,
carrying a bag"
imgs/alice_2.jpg,alice,south,train,

imgs/bob_1.jpg,bob,north,query,a man in black
imgs/bob_2.jpg,bob,south,gallery,
imgs/carol_1.jpg,carol,south,gallery,
"""
NEXT_LINE = 9  # the line of a row appended to GOOD_CSV


def _stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jpeg(path: Path, shade: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 32), (shade, 40, 200 - shade)).save(path, quality=90)


@pytest.fixture
def project(tmp_path, monkeypatch, params_dict):
    """A project folder with the default params plus ``mine``: own/mine/ (5 JPEGs + dataset.csv)."""
    monkeypatch.chdir(tmp_path)
    for i, name in enumerate(("alice_1", "alice_2", "bob_1", "bob_2", "carol_1", "extra")):
        _jpeg(FOLDER / "imgs" / f"{name}.jpg", 20 * i)
    _jpeg(Path("own/outside.jpg"))
    CSV.write_text(GOOD_CSV)
    params_dict["datasets"]["mine"] = {"layout": "csv", "source": "dir", "location": str(FOLDER)}
    Path("params.yaml").write_text(yaml.safe_dump(params_dict, sort_keys=False))
    return tmp_path


def _outputs() -> list[str]:
    return [p for p in ("data/raw/mine", "data/manifests/mine.parquet", "reports/stats/datasets/mine.json",
                        "reports/stats/datasets/mine.bad_images.txt") if Path(p).exists()]


def test_good_csv_gives_a_deterministic_manifest(project):
    _stage("download").main(load_config("params.yaml"), "mine")
    df = read_manifest("data/manifests/mine.parquet")
    got = [tuple(r) for r in df[["image_id", "split", "pid", "camid", "caption"]].itertuples(index=False)]
    assert [g[:4] for g in got] == [
        ("imgs/bob_2.jpg", "gallery", 1, 1), ("imgs/carol_1.jpg", "gallery", 2, 1),
        ("imgs/bob_1.jpg", "query", 1, 0),
        ("imgs/alice_1.jpg", "train", 0, 0), ("imgs/alice_2.jpg", "train", 0, 1)]
    captions = dict(zip(df["image_id"], df["caption"]))
    assert captions["imgs/alice_1.jpg"] == "a woman in a red coat,\ncarrying a bag"
    assert captions["imgs/bob_1.jpg"] == "a man in black"
    assert df.set_index("image_id")["caption"].isna()[["imgs/alice_2.jpg", "imgs/bob_2.jpg"]].all()
    assert (df["dataset"] == "mine").all()
    assert (Path("data/raw/mine") / "imgs/bob_2.jpg").is_file()  # the images, mirrored under data/raw
    first = Path("data/manifests/mine.parquet").read_bytes()
    _stage("download").main(load_config("params.yaml"), "mine")
    assert Path("data/manifests/mine.parquet").read_bytes() == first  # same CSV, same bytes


def test_ids_sort_as_numbers_when_all_are_integers(tmp_path):
    for name in "abcd":
        _jpeg(tmp_path / f"{name}.jpg")
    (tmp_path / "dataset.csv").write_text("path,pid,camid,split\na.jpg,10,3,train\nb.jpg,2,1,train\n"
                                          "c.jpg,007,3,query\nd.jpg,7,12,gallery\n")
    df = parse_layout("csv", tmp_path, "nums").set_index("image_id")
    assert df["pid"].to_dict() == {"a.jpg": 2, "b.jpg": 0, "c.jpg": 1, "d.jpg": 1}  # 2 < 7 = 007 < 10
    assert df["camid"].to_dict() == {"a.jpg": 1, "b.jpg": 0, "c.jpg": 1, "d.jpg": 2}  # 1 < 3 < 12
    assert "caption" not in df.columns


def _outside(folder: Path) -> str:
    return "../outside.jpg"


def _absolute(folder: Path) -> str:
    return str(Path("own/outside.jpg").resolve())


def _symlink(folder: Path) -> str:
    os.symlink(Path("own/outside.jpg").resolve(), folder / "imgs/link.jpg")
    return "imgs/link.jpg"


def _truncated(folder: Path) -> str:
    path = folder / "imgs/broken.jpg"
    path.write_bytes((folder / "imgs/extra.jpg").read_bytes()[:60])
    return "imgs/broken.jpg"


# (row appended to the good CSV, with {path} from the setup; the setup; words the error must hold)
BAD_ROWS = {
    "dotdot": ("{path},dave,north,train", _outside, "outside"),
    "absolute": ("{path},dave,north,train", _absolute, "outside"),
    "symlink-out": ("{path},dave,north,train", _symlink, "outside"),
    "missing": ("{path},dave,north,train", lambda f: "imgs/nope.jpg", "not found"),
    "unreadable": ("{path},dave,north,train", _truncated, "unreadable"),
    "split": ("{path},dave,north,test", lambda f: "imgs/extra.jpg", "'test'"),
    "empty-pid": ("{path},,north,train", lambda f: "imgs/extra.jpg", "empty pid"),
    "empty-camid": ("{path},dave,,train", lambda f: "imgs/extra.jpg", "empty camid"),
    "duplicate": ("{path},alice,south,train", lambda f: "./imgs/alice_2.jpg", "listed twice (first at line 4)"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_is_one_line_and_nothing_is_written(project, case, capsys):
    row, setup, words = BAD_ROWS[case]
    path = setup(FOLDER)
    CSV.write_text(GOOD_CSV + row.format(path=path) + "\n")
    download = _stage("download")
    with pytest.raises(SystemExit) as exit_:
        run_stage("download@mine", lambda cfg: download.main(cfg, "mine"))
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"dmf download@mine: error: {CSV}:{NEXT_LINE}: ")
    assert repr(path) in lines[0] and words in lines[0]
    assert _outputs() == []


def test_query_identity_absent_from_the_gallery_warns(project, caplog):
    CSV.write_text(GOOD_CSV + "imgs/extra.jpg,dave,north,query,\n")
    with caplog.at_level(logging.WARNING, logger="dmf_core.data.sources.layouts"):
        _stage("download").main(load_config("params.yaml"), "mine")
    warned = [r.getMessage() for r in caplog.records if "absent from the gallery" in r.getMessage()]
    assert len(warned) == 1 and f"line {NEXT_LINE}" in warned[0] and "'dave'" in warned[0]
    assert (read_manifest("data/manifests/mine.parquet")["split"] == "query").sum() == 2


def test_bad_header_extra_cell_and_synth_source_are_refused(project, params_dict):
    CSV.write_text(GOOD_CSV.replace("camid", "camera", 1))
    with pytest.raises(ValueError, match=rf"{CSV}:1: missing column\(s\) \['camid'\]"):
        _stage("download").main(load_config("params.yaml"), "mine")
    CSV.write_text(GOOD_CSV + "imgs/extra.jpg,dave,north,train,a caption,one cell too many\n")
    with pytest.raises(ValueError, match=rf"{CSV}: .*Expected 5 fields"):  # never a dropped cell
        _stage("download").main(load_config("params.yaml"), "mine")
    assert _outputs() == []
    params_dict["datasets"]["mine"] = {"layout": "csv", "source": "synth"}
    Path("params.yaml").write_text(yaml.safe_dump(params_dict, sort_keys=False))
    with pytest.raises(ConfigError, match="layout csv"):
        load_config("params.yaml")


def test_csv_dataset_packs(project):
    cfg = load_config("params.yaml")
    _stage("download").main(cfg, "mine")
    _stage("pack").main(cfg, "mine")
    for split, count in (("train", 2), ("query", 1), ("gallery", 2)):
        assert paths.lmdb_path("mine", split).is_file()
        assert len(pd.read_parquet(sidecar_path(paths.lmdb_path("mine", split)))) == count


def test_each_image_is_decoded_once(project, monkeypatch):
    """The csv layout decodes every image to refuse an unreadable one by its line; the download
    stage's verification then trusts it instead of decoding them all a second time."""
    from dmf_core.data.sources import layouts, manifest

    decoded, check = [], manifest.check_image

    def counting(path):
        decoded.append(Path(path).name)
        return check(path)

    monkeypatch.setattr(layouts, "check_image", counting)
    monkeypatch.setattr(manifest, "check_image", counting)
    _stage("download").main(load_config("params.yaml"), "mine")
    assert len(decoded) == len(set(decoded)) == 5
    assert Path("reports/stats/datasets/mine.bad_images.txt").read_text() == ""
