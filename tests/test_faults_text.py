"""Fault injection, hostile text: attribute files, captions JSON, file-name parsers (hypothesis).

BOM / CRLF / unknown codes / the attribute reader's properties live in test_attributes.py;
this file adds empty cells, ragged rows, non-UTF-8 bytes, FineGPR-C JSON with missing fields,
and property tests of the Market / FineGPR / RandPerson / MSMT17 name parsers.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmf_core.data.captions.attributes import ATTRIBUTE_COLUMNS, AttributeFileError, read_attributes
from dmf_core.data.captions.generate import CaptionInputError, read_finegpr_c
from dmf_core.data.sources.layouts import parse_layout

HEADER = ",".join(["pid", *ATTRIBUTE_COLUMNS])
ROW1 = "0001," + ",".join(["1"] * 13)
ROW2 = "0002," + ",".join(["2"] * 13)

# --------------------------------------------------------------------------------------------- attributes


@pytest.mark.parametrize(("body", "match"), [
    (f"{HEADER}\n{ROW1}\n0002,1,,2,2,2,2,2,2,2,2,2,2,2\n", r"hair.*line 3 pid='0002' hair=''"),
    (f"{HEADER}\n{ROW1}\n,1,1,1,1,1,1,1,1,1,1,1,1,1\n", r"column 'pid'.*line 3 pid=''"),
    (f"{HEADER}\n{ROW1}\n0002,1,1\n", r"line 3 pid='0002'"),            # short row: cells left empty
    (f"{HEADER}\n{ROW1}\n0002,{'1,' * 13}1\n", r"attr\.csv"),                # one cell too many
    (f"{HEADER}\n{ROW1}\n  \n0002, 1 ,{'2,' * 10}2,nan\n", r"lower_color.*'nan'"),
])
def test_empty_and_ragged_cells_name_file_line_and_column(tmp_path, body, match):
    path = tmp_path / "attr.csv"
    path.write_text(body)
    with pytest.raises(AttributeFileError, match=match) as err:
        read_attributes(path)
    assert str(path) in str(err.value)
    if "attr" not in match:  # ragged beyond the header: the whole file is refused
        skipped = read_attributes(path, on_bad_rows="skip")
        assert skipped["pid"].tolist() == [1]


@pytest.mark.parametrize("bad", [b"\xff\xfe", b"caf\xe9", b"\xc3\x28", b"\x00\x9f"])
def test_non_utf8_bytes_are_one_clear_error(tmp_path, bad):
    path = tmp_path / "attr.csv"
    path.write_bytes(f"{HEADER}\n{ROW1}\n".encode() + b"0002," + bad + b"," + b",".join([b"2"] * 12) + b"\n")
    with pytest.raises(AttributeFileError, match=r"attr\.csv: not UTF-8 text"):
        read_attributes(path)


def test_utf16_file_is_a_clear_error(tmp_path):
    path = tmp_path / "attr.csv"
    path.write_bytes(f"{HEADER}\n{ROW1}\n".encode("utf-16"))
    with pytest.raises(AttributeFileError, match="not UTF-8"):
        read_attributes(path)


# --------------------------------------------------------------------------------------------- captions JSON

MANIFEST = pd.DataFrame({"image_id": ["FineGPR/0001/0001_c01_w01_l01_p01.jpg", "FineGPR/0002/0002_c02_w01_l01_p01.jpg"],
                         "split": "train", "pid": [1, 2], "camid": [0, 1], "dataset": "finegpr"})
GOOD = {"images": [{"id": 1, "file_name": "0001_c01_w01_l01_p01.jpg"}, {"id": 2, "file_name": "0002_c02_w01_l01_p01.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "caption": "A man."}, {"id": 2, "image_id": 2, "caption": "A woman."}]}


def _variant(kind: str):
    data = json.loads(json.dumps(GOOD))
    if kind == "no_annotations_key":
        del data["annotations"]
    elif kind == "no_images_key":
        del data["images"]
    elif kind == "list_top":
        return [GOOD]
    elif kind == "image_without_file_name":
        del data["images"][0]["file_name"]
    elif kind == "image_without_id":
        del data["images"][1]["id"]
    elif kind == "annotation_without_caption":
        del data["annotations"][1]["caption"]
    elif kind == "annotation_without_image_id":
        del data["annotations"][0]["image_id"]
    elif kind == "caption_null":
        data["annotations"][0]["caption"] = None
    elif kind == "empty_annotations":
        data["annotations"] = []
    elif kind == "dangling_image_id":
        data["annotations"][1]["image_id"] = 99
    return data


@pytest.mark.parametrize("kind", ["no_annotations_key", "no_images_key", "list_top", "image_without_file_name",
                                  "image_without_id", "annotation_without_caption", "annotation_without_image_id",
                                  "caption_null", "empty_annotations", "dangling_image_id"])
def test_finegpr_c_missing_fields_are_caption_input_errors(tmp_path, kind):
    path = tmp_path / "finegpr_c.json"
    path.write_text(json.dumps(_variant(kind)))
    with pytest.raises(CaptionInputError) as err:
        read_finegpr_c(path, MANIFEST)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("raw", [b"", b"{\"images\": [", b"\xff\xfe{}", b"null"])
def test_finegpr_c_not_json_or_not_utf8(tmp_path, raw):
    path = tmp_path / "finegpr_c.json"
    path.write_bytes(raw)
    with pytest.raises(CaptionInputError, match="finegpr_c.json"):
        read_finegpr_c(path, MANIFEST)


def test_finegpr_c_skip_keeps_the_good_rows(tmp_path):
    path = tmp_path / "finegpr_c.json"
    path.write_text(json.dumps(_variant("dangling_image_id")))
    out = read_finegpr_c(path, MANIFEST, on_bad_rows="skip")
    assert out["image_id"].tolist() == [MANIFEST.image_id[0]]


# --------------------------------------------------------------------------------------------- name parsers

PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
junk = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="/\\\0", exclude_categories=("Cs",)),
               min_size=1, max_size=24).filter(lambda s: s not in (".", ".."))


def _parse_one(layout: str, rel: str, data: bytes = b"x"):
    """Write one file at ``rel`` in a fresh root and parse it; returns (frame | exception)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ds"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.write_bytes(data)
        except OSError:  # a name the file system itself refuses (too long ...): not the parser's business
            return None
        try:
            return parse_layout(layout, root, "ds")
        except ValueError as exc:
            return exc


@PROPS
@given(pid=st.integers(0, 99999), cam=st.integers(1, 99), seq=st.integers(0, 9), frame=st.integers(0, 999999),
       split=st.sampled_from(["bounding_box_train", "query", "bounding_box_test"]))
def test_market_valid_names_round_trip(pid, cam, seq, frame, split):
    name = f"{pid:04d}_c{cam}s{seq}_{frame:06d}_01.jpg"
    got = _parse_one("market", f"{split}/{name}")
    assert isinstance(got, pd.DataFrame), got
    row = got.iloc[0]
    assert (row.image_id, row.pid, row.camid) == (f"{split}/{name}", pid, cam - 1)


@PROPS
@given(pid=st.integers(0, 9999), c=st.integers(1, 36), w=st.integers(1, 7), l_=st.integers(1, 7), p=st.integers(1, 9),
       ext=st.sampled_from(["jpg", "JPG", "jpeg", "png"]))
def test_finegpr_valid_names_round_trip(pid, c, w, l_, p, ext):
    name = f"{pid:04d}_c{c:02d}_w{w:02d}_l{l_:02d}_p{p:02d}.{ext}"
    got = _parse_one("finegpr", f"FineGPR/{pid:04d}/{name}")
    assert isinstance(got, pd.DataFrame), got
    row = got.iloc[0]
    assert (row.pid, row.camid, row.viewpoint, row.weather, row.illumination, row.scene) == (pid, c - 1, c, w, l_, p)


@PROPS
@given(pid=st.integers(0, 999999), s=st.integers(0, 10), c=st.integers(0, 1), f=st.integers(0, 999999))
def test_randperson_valid_names_round_trip(pid, s, c, f):
    name = f"{pid:06d}_s{s:02d}_c{c:02d}_f{f:06d}.jpg"
    got = _parse_one("randperson", f"randperson_subset/{name}")
    assert isinstance(got, pd.DataFrame), got
    assert got.iloc[0].pid == pid


def _invalid_outcome(layout: str, rel: str, name: str):
    got = _parse_one(layout, rel)
    if got is None:
        return
    if isinstance(got, pd.DataFrame):
        if got.empty:  # hidden files (".name", macOS "._name") are skipped; Market junk (pid -1) dropped
            assert name.startswith(".") or (layout == "market" and re.match(r"^-0*1_c\d+", name))
            return None
        return got  # accepted: the caller checks it really matches the layout's pattern
    assert isinstance(got, ValueError)
    assert name in str(got), f"error does not name the file: {got}"


@PROPS
@given(name=junk, ext=st.sampled_from([".jpg", ".png"]))
def test_market_invalid_names_raise_value_error_naming_the_file(name, ext):
    got = _invalid_outcome("market", f"bounding_box_train/{name}{ext}", f"{name}{ext}")
    if isinstance(got, pd.DataFrame):
        assert re.match(r"^-?\d+_c\d+", name)


@PROPS
@given(name=junk, ext=st.sampled_from([".jpg", ".png"]))
def test_finegpr_invalid_names_raise_value_error_naming_the_file(name, ext):
    got = _invalid_outcome("finegpr", f"FineGPR/0001/{name}{ext}", f"{name}{ext}")
    if isinstance(got, pd.DataFrame):
        assert re.match(r"^\d+_c\d+_w\d+_l\d+_p\d+$", name, re.IGNORECASE)


@PROPS
@given(name=junk)
def test_randperson_invalid_names_raise_value_error_naming_the_file(name):
    got = _invalid_outcome("randperson", f"randperson_subset/{name}.jpg", f"{name}.jpg")
    if isinstance(got, pd.DataFrame):
        assert re.match(r"^\d+_s\d+_c\d+_f\d+$", name)


def _msmt(line: str):
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "MSMT17_V1"
        for d in ("train", "test"):
            (base / d).mkdir(parents=True)
        (base / "list_train.txt").write_bytes(line.encode("utf-8", "surrogatepass"))
        for name in ("list_val.txt", "list_query.txt", "list_gallery.txt"):
            (base / name).write_text("")
        try:
            return parse_layout("msmt17", Path(tmp), "msmt17")
        except ValueError as exc:
            return exc


@settings(max_examples=10, deadline=None)
@given(pid=st.integers(0, 4100), idx=st.integers(0, 999), cam=st.integers(1, 15))
def test_msmt17_valid_list_lines_round_trip(pid, idx, cam):
    rel = f"{pid:04d}/{pid:04d}_{idx:03d}_{cam:02d}_0303morning_0015_0.jpg"
    got = _msmt(f"{rel} {pid}\n")
    assert isinstance(got, pd.DataFrame), got
    row = got.iloc[0]
    assert (row.image_id, row.pid, row.camid) == (f"MSMT17_V1/train/{rel}", pid, cam - 1)


@PROPS
@given(line=st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029",
                                           exclude_categories=("Cs",)), min_size=1, max_size=40))
def test_msmt17_invalid_list_lines_raise_value_error_naming_the_list(line):
    got = _msmt(line + "\n")
    if isinstance(got, pd.DataFrame):
        if got.empty:  # blank lines are skipped
            assert not line.strip()
            return
        parts = line.split()
        assert len(parts) == 2 and parts[1].isdigit() and len(got) == 1
        return
    assert isinstance(got, ValueError)
    assert "list_train.txt" in str(got)
