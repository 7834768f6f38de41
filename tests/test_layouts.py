"""Layout parsers, manifest schema/I-O, statistics check and image verification (no network)."""

from __future__ import annotations

import hashlib
import shutil

import pandas as pd
import pytest
from _archives import (
    build_cuhk03np,
    build_finegpr,
    build_market,
    build_msmt17,
    build_randperson,
    jpeg_bytes,
)

from dmf_core.data.sources.layouts import RANDPERSON_CAM_OFFSETS, parse_layout
from dmf_core.data.sources.manifest import (
    MANIFEST_COLUMNS,
    StatisticsError,
    check_statistics,
    read_manifest,
    statistics,
    validate_manifest,
    verify_images,
    write_manifest,
)


def _check_common(df: pd.DataFrame, root, dataset: str) -> None:
    validate_manifest(df)
    assert list(df.columns[:5]) == list(MANIFEST_COLUMNS)
    assert (df["dataset"] == dataset).all()
    assert list(df.itertuples(index=False)) == list(
        df.sort_values(["split", "image_id"]).itertuples(index=False))
    for image_id in df["image_id"]:
        assert (root / image_id).is_file(), image_id
        assert not image_id.startswith("/") and "\\" not in image_id


@pytest.mark.parametrize("nested", [True, False], ids=["extracted", "flat"])
def test_market(tmp_path, nested):
    root = tmp_path / "market1501"
    expected = build_market(root, top="Market-1501-v15.09.15" if nested else "")
    df = parse_layout("market", root, "market1501")
    _check_common(df, root, "market1501")
    assert (df["pid"] >= 0).all()  # junk -1 dropped
    assert ((df["pid"] == 0) & (df["split"] == "gallery")).sum() == 2  # distractors kept
    assert df["camid"].between(0, 5).all() and df["camid"].max() == 5
    assert check_statistics(df, expected)["ok"].all()
    assert statistics(df) == expected
    if nested:
        assert df["image_id"].str.startswith("Market-1501-v15.09.15/").all()


def test_duke_names(tmp_path):
    root = tmp_path / "duke"
    expected = build_market(root, top="DukeMTMC-reID", cams=8, duke=True)
    df = parse_layout("market", root, "dukemtmcreid")
    _check_common(df, root, "dukemtmcreid")
    assert statistics(df) == expected


@pytest.mark.parametrize("variant", ["detected", "labeled"])
def test_cuhk03np(tmp_path, variant):
    root = tmp_path / "cuhk"
    expected = build_cuhk03np(root)
    df = parse_layout("cuhk03np", root, f"cuhk03np_{variant}")
    _check_common(df, root, f"cuhk03np_{variant}")
    assert df["image_id"].str.startswith(f"cuhk03-np/{variant}/").all()
    assert set(df["camid"]) == {0, 1}
    check_statistics(df, expected[variant])
    # an explicit variant wins over the dataset name
    other = "labeled" if variant == "detected" else "detected"
    assert statistics(parse_layout("cuhk03np", root, "x", variant=other)) == expected[other]


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_msmt17(tmp_path, version):
    root = tmp_path / "msmt"
    expected, expected_all = build_msmt17(root, version)
    df = parse_layout("msmt17", root, "msmt17")
    _check_common(df, root, "msmt17")
    check_statistics(df, expected)
    assert df["camid"].between(0, 14).all() and 14 in set(df["camid"])
    folder = "train" if version == "V1" else "mask_train_v2"
    assert df.loc[df["split"] == "train", "image_id"].str.startswith(f"MSMT17_{version}/{folder}/").all()

    all_df = parse_layout("msmt17", root, "msmt17_all")
    _check_common(all_df, root, "msmt17_all")
    assert set(all_df["split"]) == {"train"}
    check_statistics(all_df, expected_all)
    # combine_all: test pids come after the train pids (QAConv offset = number of train ids)
    test_rows = all_df[all_df["image_id"].str.contains("/test/|/mask_test_v2/")]
    assert test_rows["pid"].min() == 3


def test_msmt17_bad_list_line(tmp_path):
    root = tmp_path / "msmt"
    build_msmt17(root)
    (root / "MSMT17_V1" / "list_query.txt").write_text("0000/0000_000_02_0113noon_0000_1.jpg\n")
    with pytest.raises(ValueError, match="list_query.txt:1"):
        parse_layout("msmt17", root, "msmt17")


def test_randperson(tmp_path):
    root = tmp_path / "rp"
    expected = build_randperson(root)
    df = parse_layout("randperson", root, "randperson_subset")
    _check_common(df, root, "randperson_subset")
    check_statistics(df, expected)
    assert set(df["split"]) == {"train"}
    row = df[df["image_id"].str.contains("_s10_c03_")].iloc[0]
    assert row["camid"] == RANDPERSON_CAM_OFFSETS[10] + 3 == 18


@pytest.mark.parametrize("subset", [False, True], ids=["full", "subset"])
def test_finegpr(tmp_path, subset):
    root = tmp_path / "fgpr"
    expected = build_finegpr(root, subset=subset)
    df = parse_layout("finegpr", root, "finegpr_subset" if subset else "finegpr")
    _check_common(df, root, df["dataset"].iloc[0])
    check_statistics(df, expected)
    assert list(df.columns) == [*MANIFEST_COLUMNS, "viewpoint", "weather", "illumination", "scene"]
    row = df[df["image_id"].str.endswith("0003_c10_w02_l03_p02.jpg")].iloc[0]
    assert (row["pid"], row["camid"], row["viewpoint"], row["weather"], row["illumination"], row["scene"]) == (
        3, 9, 10, 2, 3, 2)
    assert set(df["split"]) == {"train"}


def test_finegpr_generator_style_root(tmp_path):
    """Images directly below root (as SynthPed may write them) are found too."""
    root = tmp_path / "synthped"
    (root / "0001").mkdir(parents=True)
    (root / "0001" / "0001_c01_w01_l01_p01.jpg").write_bytes(jpeg_bytes())
    (root / "attributes.csv").write_text("pid\n1\n")
    df = parse_layout("finegpr", root, "synthped")
    assert df["image_id"].tolist() == ["0001/0001_c01_w01_l01_p01.jpg"]


@pytest.mark.parametrize(("layout", "bad_name", "where"), [
    ("market", "abc_c1s1_000001_01.jpg", "bounding_box_train"),
    ("market", "0001_c0s1_000001_01.jpg", "query"),
    ("finegpr", "0001_c37_w01_l01_p01.jpg", "FineGPR/0001"),
    ("finegpr", "0001_c01_w01_l01.jpg", "FineGPR/0001"),
    ("randperson", "000001_s11_c00_f000001.jpg", "randperson_subset"),
])
def test_malformed_name_names_the_file(tmp_path, layout, bad_name, where):
    root = tmp_path / "ds"
    {"market": lambda r: build_market(r, top=""), "finegpr": lambda r: build_finegpr(r),
     "randperson": build_randperson}[layout](root)
    base = root / "FineGPR_Dataset" if layout == "finegpr" else root
    (base / where).mkdir(parents=True, exist_ok=True)
    (base / where / bad_name).write_bytes(jpeg_bytes())
    with pytest.raises(ValueError, match=bad_name):
        parse_layout(layout, root, "ds")


def test_unknown_layout_and_missing_root(tmp_path):
    with pytest.raises(ValueError, match="layout 'nope'"):
        parse_layout("nope", tmp_path, "x")
    with pytest.raises(FileNotFoundError):
        parse_layout("market", tmp_path / "missing", "x")
    with pytest.raises(ValueError, match="no Market-style folder"):
        parse_layout("market", tmp_path, "x")


# ---------------------------------------------------------------------------------------------
# Statistics check
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("allow_partial", [False, True])
def test_statistics_mismatch_table(tmp_path, allow_partial):
    root = tmp_path / "m"
    expected = build_market(root)
    expected["gallery"]["images"] += 5
    df = parse_layout("market", root, "m")
    if allow_partial:
        table = check_statistics(df, expected, allow_partial=True)
        assert not table.set_index("split").loc["gallery", "ok"]
        assert table.set_index("split").loc["train", "ok"]
    else:
        with pytest.raises(StatisticsError) as err:
            check_statistics(df, expected, allow_partial=False)
        msg = str(err.value)
        assert "expected_images" in msg and "found_images" in msg and "gallery" in msg
        assert str(expected["gallery"]["images"]) in msg


def test_statistics_unknown_counts_and_missing_split(tmp_path):
    root = tmp_path / "f"
    build_finegpr(root, subset=True)
    df = parse_layout("finegpr", root, "finegpr_subset")
    check_statistics(df, {"train": {"ids": 3, "images": None}})
    with pytest.raises(StatisticsError, match="query"):
        check_statistics(df, {"train": {"ids": 3, "images": None}, "query": {"ids": 1, "images": 1}})


# ---------------------------------------------------------------------------------------------
# Manifest I/O and validation
# ---------------------------------------------------------------------------------------------


def test_write_read_roundtrip_deterministic(tmp_path):
    root = tmp_path / "fg"
    build_finegpr(root)
    df = parse_layout("finegpr", root, "finegpr")
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_manifest(df, a)
    write_manifest(df.sample(frac=1.0, random_state=0), b)  # row order does not matter
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    back = read_manifest(a)
    pd.testing.assert_frame_equal(back.reset_index(drop=True), df, check_dtype=False)
    assert back["pid"].dtype == "int64"


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda d: d.drop(columns=["camid"]), "missing column"),
    (lambda d: d.assign(split="val"), "split"),
    (lambda d: d.assign(pid=-1), "pid"),
    (lambda d: d.assign(image_id="../x.jpg"), "image_id"),
    (lambda d: d.assign(camid=d["camid"].astype(float)), "camid"),
    (lambda d: pd.concat([d, d]), "more than once"),
])
def test_validate_manifest_rejects(tmp_path, mutate, match):
    root = tmp_path / "m"
    build_market(root)
    df = parse_layout("market", root, "m")
    with pytest.raises(ValueError, match=match):
        validate_manifest(mutate(df))


# ---------------------------------------------------------------------------------------------
# Image verification
# ---------------------------------------------------------------------------------------------


def test_verify_images_reports_corrupt_and_truncated(tmp_path):
    root = tmp_path / "m"
    build_market(root, top="")
    df = parse_layout("market", root, "m")
    ids = df["image_id"].tolist()
    (root / ids[0]).write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / ids[1]).write_bytes(jpeg_bytes()[: len(jpeg_bytes()) // 2])  # truncated
    (root / ids[2]).unlink()  # listed but missing
    report = tmp_path / "bad.txt"
    bad = verify_images(df, root, report)
    assert bad == sorted(ids[:3])
    lines = report.read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == sorted(ids[:3])
    assert any("missing file" in line for line in lines)
    # a clean dataset writes an empty report
    assert verify_images(df.iloc[3:], root, report) == [] and report.read_text() == ""


def test_verify_images_keeps_the_decompression_bomb_guard(tmp_path, monkeypatch):
    from PIL import Image

    root = tmp_path / "m"
    build_market(root, top="")
    df = parse_layout("market", root, "m")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # 8x16 test images exceed 2x this limit
    bad = verify_images(df, root, tmp_path / "bad.txt")
    assert len(bad) == len(df)
    assert "DecompressionBomb" in (tmp_path / "bad.txt").read_text()


@pytest.mark.parametrize("image_id", ["/abs.jpg", "a/../b.jpg", "..", "a\\b.jpg", "./a.jpg", "a//b.jpg"])
def test_validate_manifest_rejects_unclean_paths(image_id):
    df = pd.DataFrame({"image_id": [image_id], "split": ["train"], "pid": [1], "camid": [0], "dataset": ["d"]})
    with pytest.raises(ValueError, match="clean relative posix path"):
        validate_manifest(df)


def test_unknown_layout_option(tmp_path):
    build_randperson(tmp_path)
    with pytest.raises(ValueError, match="unknown option"):
        parse_layout("randperson", tmp_path, "x", combine_all=True)


# ---------------------------------------------------------------------------------------------
# The layout search never takes another dataset (issue 15)
# ---------------------------------------------------------------------------------------------


def test_market_next_to_cuhk03np_is_ambiguous(tmp_path):
    root = tmp_path / "mixed"
    build_market(root)
    build_cuhk03np(root)
    with pytest.raises(ValueError, match="ambiguous") as err:
        parse_layout("market", root, "market1501")
    for candidate in ("Market-1501-v15.09.15", "cuhk03-np/detected", "cuhk03-np/labeled"):
        assert candidate in str(err.value)
    # the CUHK03-NP variants in the same folder are still told apart by name
    assert parse_layout("cuhk03np", root, "cuhk03np_labeled").attrs["folder"] == "cuhk03-np/labeled"


def test_cuhk03np_labeled_without_labeled_is_refused(tmp_path):
    root = tmp_path / "cuhk"
    build_cuhk03np(root)
    shutil.rmtree(root / "cuhk03-np" / "labeled")
    with pytest.raises(ValueError, match=r"needs the 'labeled'.*only cuhk03-np/detected is there"):
        parse_layout("cuhk03np", root, "cuhk03np_labeled")
    assert parse_layout("cuhk03np", root, "cuhk03np_detected").attrs["folder"] == "cuhk03-np/detected"


def test_msmt17_versions_side_by_side(tmp_path):
    root = tmp_path / "msmt"
    build_msmt17(root, "V1")
    build_msmt17(root, "V2")
    with pytest.raises(ValueError, match=r"\(MSMT17_V1, MSMT17_V2\).*ambiguous"):
        parse_layout("msmt17", root, "msmt17_all")
    # a registry variant picks by the image folders, whatever the top folder is called
    (root / "MSMT17_V2").rename(root / "release")
    df = parse_layout("msmt17", root, "x", variant="MSMT17_V2")
    assert df.attrs["folder"] == "release" and df["image_id"].str.startswith("release/mask_").all()


def test_statistics_table_names_the_folder(tmp_path):
    root = tmp_path / "market1501"
    expected = build_market(root)
    df = parse_layout("market", root, "market1501")
    assert df.attrs["folder"] == "Market-1501-v15.09.15"
    expected["query"]["images"] += 1
    with pytest.raises(StatisticsError, match="read from folder Market-1501-v15.09.15\n"):
        check_statistics(df, expected)
    flat = tmp_path / "flat"
    build_market(flat, top="")
    assert parse_layout("market", flat, "m").attrs["folder"] == "."


def test_msmt17_duplicate_names_both_list_lines(tmp_path):
    root = tmp_path / "msmt"
    build_msmt17(root)
    base = root / "MSMT17_V1"
    first = (base / "list_train.txt").read_text().splitlines()[1]
    val = (base / "list_val.txt").read_text().splitlines()
    (base / "list_val.txt").write_text("\n".join([*val, first]) + "\n")
    with pytest.raises(ValueError, match="listed twice") as err:
        parse_layout("msmt17", root, "msmt17")
    assert f"{base / 'list_train.txt'}:2" in str(err.value)
    assert f"{base / 'list_val.txt'}:{len(val) + 1}" in str(err.value)
