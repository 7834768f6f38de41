"""Captions people wrote: CUHK-PEDES / ICFG-PEDES / RSTPReid JSON and a manifest's caption column."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from dmf_core.data.captions import generate as cap
from dmf_core.data.captions import published as wc
from dmf_core.data.captions.generate import CaptionInputError

IDS = ["imgs/cam_a/p1_s1.jpg", "imgs/cam_b/p1_s2.jpg", "imgs/test/p2_s3.jpg"]
MANIFEST = pd.DataFrame({"image_id": IDS, "pid": [1, 1, 2], "camid": [0, 1, 0], "split": "train",
                         "dataset": "x"})


def _entries(path_key: str, paths=("cam_a/p1_s1.jpg", "cam_b/p1_s2.jpg", "test/p2_s3.jpg")) -> list[dict]:
    out = []
    for i, p in enumerate(paths):
        e = {"id": i // 2 + 1, path_key: p, "captions": [f"A man in a red coat {i}.", f" He walks {i}. "],
             "split": "train" if i < 2 else "test"}
        if path_key == "file_path":
            e["processed_tokens"] = [["a", "man"], ["he", "walks"]]
        out.append(e)
    return out


def _write(tmp_path, entries, name="reid_raw.json"):
    path = tmp_path / name
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


READERS = [("cuhk_pedes", "file_path", wc.read_cuhk_pedes), ("icfg_pedes", "file_path", wc.read_icfg_pedes),
           ("rstpreid", "img_path", wc.read_rstpreid)]


@pytest.mark.parametrize(("source", "key", "reader"), READERS)
def test_each_format_reads_into_the_caption_table(tmp_path, source, key, reader):
    path = _write(tmp_path, _entries(key))
    df = reader(path, MANIFEST, images="imgs")
    assert list(df.columns) == ["image_id", "caption_idx", "caption"]
    assert df["image_id"].tolist() == sorted(IDS * 2)
    assert df["caption_idx"].tolist() == [0, 1] * 3 and df["caption_idx"].dtype == "int16"
    assert df["caption"].iloc[1] == "He walks 0."  # stripped, JSON order kept
    assert df.attrs["entries"] == {"test": 1, "train": 2}
    assert df.attrs["skipped"]["manifest_images_without_caption"] == 0
    pd.testing.assert_frame_equal(wc.read_published(source, path, MANIFEST, images="imgs"), df)
    # the same table the pretraining reads: write_captions round-trips it, and the metrics count it
    cap.write_captions(df, tmp_path / "o.parquet", tmp_path / "o.json")
    back = pd.read_parquet(tmp_path / "o.parquet")
    assert back["image_id"].tolist() == df["image_id"].tolist() and back["caption"].tolist() == df["caption"].tolist()
    metrics = cap.caption_metrics(df)
    assert metrics["images_captioned"] == 3 and metrics["captions"] == 6


def test_images_folder_is_the_prefix_and_duplicates_join(tmp_path):
    entries = _entries("img_path", paths=("cam_a/p1_s1.jpg", "./cam_a//p1_s1.jpg", "test/p2_s3.jpg"))
    df = wc.read_rstpreid(_write(tmp_path, entries), MANIFEST, images="./imgs/")
    assert df[df["image_id"] == IDS[0]]["caption_idx"].tolist() == [0, 1, 2, 3]
    assert df.attrs["skipped"]["manifest_images_without_caption"] == 1
    with pytest.raises(CaptionInputError, match="2 image"):  # without the folder no path is a manifest id
        wc.read_rstpreid(_write(tmp_path, entries), MANIFEST)


@pytest.mark.parametrize("value", ["/etc/passwd", "../../secret.jpg", "cam_a/../../x.jpg", "C:/x.jpg",
                                   "cam_a\\p1.jpg", "", 7, None])
@pytest.mark.parametrize(("source", "key", "reader"), READERS)
def test_hostile_paths_are_refused_naming_file_entry_value(tmp_path, source, key, reader, value):
    entries = _entries(key)
    entries[1][key] = value
    path = _write(tmp_path, entries)
    for mode in ("fail", "skip"):
        with pytest.raises(CaptionInputError) as err:
            reader(path, MANIFEST, images="imgs", on_bad_rows=mode)
        message = str(err.value)
        assert "\n" not in message and str(path) in message and "entry 1" in message and repr(value) in message


def test_a_link_out_of_the_image_folder_is_refused(tmp_path):
    raw = tmp_path / "raw"
    (raw / "imgs" / "cam_a").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", raw / "imgs" / "cam_b")
    path = _write(tmp_path, _entries("file_path"))
    with pytest.raises(CaptionInputError, match=r"entry 1: file_path 'cam_b/p1_s2.jpg' is a path that resolves outside"):
        wc.read_cuhk_pedes(path, MANIFEST, images="imgs", raw_dir=raw)
    with pytest.raises(CaptionInputError, match="captions.images"):
        wc.read_cuhk_pedes(path, MANIFEST, images="../imgs", raw_dir=raw)


def test_images_not_in_the_manifest_and_empty_captions_fail_or_skip(tmp_path):
    entries = _entries("file_path") + [{"id": 9, "file_path": f"gone/{i}.jpg", "captions": ["x"], "split": "test"}
                                       for i in range(7)]
    entries[2]["captions"] = ["   ", "fine."]
    path = _write(tmp_path, entries, "ICFG-PEDES.json")
    with pytest.raises(CaptionInputError) as err:
        wc.read_icfg_pedes(path, MANIFEST, images="imgs")
    message = str(err.value)
    assert "7 image(s) not in the manifest" in message and "imgs/gone/0.jpg" in message
    assert "imgs/gone/5.jpg" not in message  # first examples only
    assert "1 empty caption(s), e.g. in entries [2]" in message and "on_bad_rows: skip" in message
    df = wc.read_icfg_pedes(path, MANIFEST, images="imgs", on_bad_rows="skip")
    assert len(df) == 5 and df.attrs["skipped"] == {
        "images_not_in_manifest": 7, "captions_of_images_not_in_manifest": 7, "captions_empty": 1,
        "manifest_images_without_caption": 0}


@pytest.mark.parametrize(("content", "match"), [
    ("{}", "expected a non-empty list"), ("[]", "empty list"), ("[1]", "entry 0: expected an object"),
    ('[{"captions": ["a"]}]', r"entry 0: lacks key\(s\) \['file_path'\]"),
    ('[{"file_path": "a.jpg", "captions": "a man"}]', "must be a list of strings"),
    ("[{", "not valid JSON")])
def test_malformed_files_name_the_file(tmp_path, content, match):
    path = tmp_path / "reid_raw.json"
    path.write_text(content)
    with pytest.raises(CaptionInputError, match=match):
        wc.read_cuhk_pedes(path, MANIFEST, on_bad_rows="skip")
    with pytest.raises(CaptionInputError, match="not found"):
        wc.read_cuhk_pedes(tmp_path / "none.json", MANIFEST)


def test_manifest_caption_column():
    man = MANIFEST.assign(caption=["  A man in red. ", None, ""])
    df = wc.read_manifest_captions(man, where="m.parquet")
    assert df.to_dict("list") == {"image_id": [IDS[0]], "caption_idx": [0], "caption": ["A man in red."]}
    assert df.attrs["skipped"]["manifest_images_without_caption"] == 2
    with pytest.raises(CaptionInputError, match="m.parquet: no 'caption' column"):
        wc.read_manifest_captions(MANIFEST, where="m.parquet")
    with pytest.raises(CaptionInputError, match="no caption left"):
        wc.read_manifest_captions(MANIFEST.assign(caption=None), where="m.parquet")


def test_captions_stage_reads_a_published_json(tmp_path, monkeypatch, params_dict):
    """The stage on a tiny SynthPed world, pointed at a CUHK-PEDES-format file of its images."""
    import importlib.util

    import yaml

    from dmf_core.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def stage(name):
        spec = importlib.util.spec_from_file_location(f"wc_{name}", os.path.join(root, "stages", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    monkeypatch.chdir(tmp_path)
    params_dict["synth"]["synthped"].update(ids=4, images_per_id=2)
    yaml.safe_dump(params_dict, open("params.yaml", "w"))
    stage("download").main(load_config("params.yaml"), "synthped")
    ids = pd.read_parquet("data/manifests/synthped.parquet")["image_id"].tolist()
    folder, _, _ = ids[0].partition("/")
    entries = [{"id": 1, "file_path": i.partition("/")[2], "captions": [f"caption {k}"], "split": "train",
                "processed_tokens": []} for k, i in enumerate(ids)]
    os.makedirs("data/archives")
    _write(tmp_path / "data" / "archives", entries)
    params_dict["captions"].update(source="cuhk_pedes", file="data/archives/reid_raw.json", images=folder)
    yaml.safe_dump(params_dict, open("params.yaml", "w"))
    stage("captions").main(load_config("params.yaml"))
    out = pd.read_parquet("data/captions/finegpr.parquet")
    assert out["image_id"].tolist() == sorted(ids) and set(out["caption_idx"]) == {0}
    stats = json.load(open("reports/stats/captions.json"))
    assert stats["caption_source"] == "cuhk_pedes" and stats["entries_per_split"] == {"train": len(ids)}
    entries[0]["file_path"] = "../../../etc/passwd"
    _write(tmp_path / "data" / "archives", entries)
    os.remove("data/captions/finegpr.parquet")
    with pytest.raises(CaptionInputError, match="entry 0: file_path '../../../etc/passwd'"):
        stage("captions").main(load_config("params.yaml"))
    assert not os.path.exists("data/captions/finegpr.parquet")  # nothing written on failure
