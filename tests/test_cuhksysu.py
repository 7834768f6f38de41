"""CUHK-SYSU as its DG users have it (issue 27): the cropped_images layout, the official counts
on a full-count fixture, and the refusal as an evaluation target."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmf_core.config import ConfigError, config_from_dict
from dmf_core.data.sources.layouts import parse_layout
from dmf_core.data.sources.manifest import StatisticsError, check_statistics, validate_manifest
from dmf_core.data.sources.registry import REGISTRY


def _crops(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).touch()  # the parser reads names only; images are decoded later


def _official_names(ids: int, images: int) -> list[str]:
    """``images`` crop names over ``ids`` identities (1..3 crops each), in the torchreid form."""
    names = [f"p{pid}_s{pid % 9000 + 1}_0.jpg" for pid in range(1, ids + 1)]
    extra, pid = images - ids, 1
    while extra:
        for n in (1, 2):
            if extra:
                names.append(f"p{pid}_s{pid % 9000 + 1}_{n}.jpg")
                extra -= 1
        pid += 1
    return names


def test_cuhksysu_layout(tmp_path):
    base = tmp_path / "cuhksysu" / "cropped_images"
    _crops(base, ["p11_s7_1.jpg", "p11_s2_2.jpg", "p3_s1_1.jpg", "p00042_s12_3.png", "Thumbs.db", ".p9_s1_1.jpg"])
    df = parse_layout("cuhksysu", tmp_path, "cuhksysu")
    validate_manifest(df)
    assert df.attrs["folder"] == "cuhksysu/cropped_images"
    assert set(df["split"]) == {"train"} and set(df["camid"]) == {0}
    assert dict(zip(df["image_id"], df["pid"])) == {
        "cuhksysu/cropped_images/p00042_s12_3.png": 42, "cuhksysu/cropped_images/p11_s2_2.jpg": 11,
        "cuhksysu/cropped_images/p11_s7_1.jpg": 11, "cuhksysu/cropped_images/p3_s1_1.jpg": 3}


def test_cuhksysu_official_counts_on_a_full_size_fixture(tmp_path):
    stats = REGISTRY["cuhksysu"].statistics
    assert stats == {"train": {"ids": 11934, "images": 34574}}
    base = tmp_path / "cuhksysu" / "cropped_images"
    names = _official_names(11934, 34574)
    _crops(base, names)
    table = check_statistics(parse_layout("cuhksysu", tmp_path, "cuhksysu"), stats)
    assert table["ok"].all() and table["found_images"].tolist() == [34574]
    (base / names[-1]).unlink()  # one crop missing: the expected-vs-found table stops it
    with pytest.raises(StatisticsError, match="read from folder cuhksysu/cropped_images"):
        check_statistics(parse_layout("cuhksysu", tmp_path, "cuhksysu"), stats)


@pytest.mark.parametrize("bad, match", [("p12_n01_s00001_hard0.jpg", "does not match p<pid>_s<scene>"),
                                        ("12_s1_1.jpg", "does not match"), ("p-1_s1_1.jpg", "pid -1 out of range")])
def test_cuhksysu_bad_name_names_the_file(tmp_path, bad, match):
    _crops(tmp_path / "cropped_images", ["p1_s1_1.jpg", bad])
    with pytest.raises(ValueError, match=match) as err:
        parse_layout("cuhksysu", tmp_path, "cuhksysu")
    assert bad in str(err.value)


def test_cuhksysu_folder_missing_or_ambiguous(tmp_path):
    _crops(tmp_path / "images", ["p1_s1_1.jpg"])
    with pytest.raises(ValueError, match="no CUHK-SYSU cropped_images/ folder"):
        parse_layout("cuhksysu", tmp_path, "cuhksysu")
    _crops(tmp_path / "a" / "cropped_images", ["p1_s1_1.jpg"])
    _crops(tmp_path / "b" / "cropped_images", ["p1_s1_1.jpg"])
    with pytest.raises(ValueError, match="ambiguous"):
        parse_layout("cuhksysu", tmp_path, "cuhksysu")


def test_cuhksysu_is_a_source_never_a_target(params_dict):
    params_dict["datasets"]["cuhksysu"] = {"layout": "cuhksysu", "source": "archive", "registry": "cuhksysu",
                                           "location": "data/archives/cuhksysu.zip"}
    params_dict["finetune"]["sources"].append("cuhksysu")
    params_dict["evaluate"]["rows"].append("cuhksysu")
    cfg = config_from_dict(params_dict)
    assert cfg.dataset("cuhksysu").layout == "cuhksysu"
    params_dict["evaluate"]["targets"].append("cuhksysu")
    with pytest.raises(ConfigError, match=r"^evaluate.targets\[3\]: 'cuhksysu' \(layout cuhksysu\) is a training "
                                          "source only"):
        config_from_dict(params_dict)
