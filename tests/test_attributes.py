"""The FineGPR attribute-file reader: canonical format, aliases, encodings, precise errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmf_core.data.captions.attributes import (
    ATTRIBUTE_CODES,
    ATTRIBUTE_COLUMNS,
    HEADER_ALIASES,
    AttributeFileError,
    canonical_column,
    read_attributes,
    write_attributes,
)


def _frame(n: int = 6, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    pids = np.sort(rng.choice(np.arange(1, 5000), size=n, replace=False))
    return pd.DataFrame({"pid": pids.astype("int64"),
                         **{c: rng.choice(list(ATTRIBUTE_CODES[c]), size=n).astype("int8") for c in ATTRIBUTE_COLUMNS}})


def _text(frame: pd.DataFrame, *, sep: str = ",", header: list[str] | None = None, pad: bool = True) -> str:
    header = header or ["pid", *ATTRIBUTE_COLUMNS]
    lines = [sep.join(header)]
    for rec in frame.itertuples(index=False):
        vals = [f"{rec[0]:04d}" if pad else str(rec[0])] + [f"{v:02d}" if pad else str(v) for v in rec[1:]]
        lines.append(sep.join(vals))
    return "\n".join(lines) + "\n"


def test_schema_matches_contract():
    assert ATTRIBUTE_COLUMNS == ("gender", "hair", "age", "glasses", "short_sleeve", "top_length", "dress", "boots",
                                 "hat", "bag", "shoe_color", "upper_color", "lower_color")
    assert ATTRIBUTE_CODES["age"] == {1: "teenager", 2: "adult", 3: "older"}
    assert ATTRIBUTE_CODES["upper_color"][9] == "brown" and ATTRIBUTE_CODES["lower_color"][5] == "gray"
    assert set(HEADER_ALIASES.values()) == {"pid", *ATTRIBUTE_COLUMNS}


def test_canonical_file_round_trip(tmp_path):
    df = _frame()
    path = tmp_path / "attributes.csv"
    write_attributes(df, path)
    assert path.read_text().splitlines()[1].split(",")[0] == f"{df.pid[0]:04d}"
    got = read_attributes(path)
    pd.testing.assert_frame_equal(got, df)
    assert got["pid"].dtype == "int64" and all(got[c].dtype == "int8" for c in ATTRIBUTE_COLUMNS)


@pytest.mark.parametrize("variant", ["bom", "crlf", "tsv", "semicolon", "unpadded", "bom_crlf_tsv"])
def test_encodings_and_delimiters(tmp_path, variant):
    df = _frame()
    sep = "\t" if "tsv" in variant else ";" if variant == "semicolon" else ","
    text = _text(df, sep=sep, pad=variant != "unpadded")
    if "crlf" in variant:
        text = text.replace("\n", "\r\n")
    data = text.encode()
    if "bom" in variant:
        data = b"\xef\xbb\xbf" + data
    path = tmp_path / "attrs.txt"
    path.write_bytes(data)
    pd.testing.assert_frame_equal(read_attributes(path), df)


def test_header_aliases_and_meaning_words(tmp_path):
    df = _frame(3)
    header = ["ID", "Gender", "Hair length", "Age", "Wear glass", "Wear short sleeve", "Length of top clothes",
              "Wear dress", "Wear boot", "Wear hat", "Carry bag", "Color of shoes", "Color of upper-body clothes",
              "upper_colour"]
    header[-1] = "Colour of lower-body clothes"
    path = tmp_path / "a.tsv"
    path.write_text(_text(df, sep="\t", header=header) + "")
    pd.testing.assert_frame_equal(read_attributes(path), df)
    # meaning words instead of codes, extra column ignored, columns reordered
    words = df.copy()
    out = pd.DataFrame({"person_id": words.pid.map(lambda p: f"{p:04d}"), "name": "x"})
    for col in reversed(ATTRIBUTE_COLUMNS):
        out[col] = words[col].map(ATTRIBUTE_CODES[col]).str.upper()
    path2 = tmp_path / "b.csv"
    out.to_csv(path2, index=False)
    pd.testing.assert_frame_equal(read_attributes(path2), df)


def test_alias_lookup():
    assert canonical_column("Wear glass") == "glasses"
    assert canonical_column("wear_glass") == "glasses"
    assert canonical_column(" Color of upper-body clothes ") == "upper_color"
    assert canonical_column("upper_colour") == "upper_color"
    assert canonical_column("person_id") == "pid"
    assert canonical_column("nonsense") is None


def test_missing_column_is_named(tmp_path):
    df = _frame(2).drop(columns=["hat"])
    path = tmp_path / "a.csv"
    path.write_text(_text(df, header=["pid", *[c for c in ATTRIBUTE_COLUMNS if c != "hat"]]))
    with pytest.raises(AttributeFileError, match=r"missing column\(s\) hat"):
        read_attributes(path)


def test_unknown_codes_listed_with_count(tmp_path):
    df = _frame(8)
    text = _text(df).splitlines()
    rows = [r.split(",") for r in text]
    for i in (2, 5, 7):
        rows[i][ATTRIBUTE_COLUMNS.index("upper_color") + 1] = "12"
    path = tmp_path / "a.csv"
    path.write_text("\n".join(",".join(r) for r in rows) + "\n")
    with pytest.raises(AttributeFileError) as err:
        read_attributes(path)
    msg = str(err.value)
    assert "'upper_color'" in msg and "3 row(s)" in msg and "'12'" in msg and "line 3" in msg
    assert "01=black" in msg
    got = read_attributes(path, on_bad_rows="skip")
    assert len(got) == 5 and got.attrs["skipped"]["attribute_rows_bad"] == 3


def test_bad_pid_and_conflicting_duplicates(tmp_path):
    df = _frame(3)
    lines = _text(df).splitlines()
    lines.append("abc," + ",".join(["01"] * len(ATTRIBUTE_COLUMNS)))
    lines.append(lines[1])  # exact duplicate: collapsed
    dup = lines[2].split(",")
    dup[1] = "02" if dup[1] == "01" else "01"
    lines.append(",".join(dup))  # conflicting duplicate
    path = tmp_path / "a.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AttributeFileError, match="pid") as err:
        read_attributes(path)
    assert "'abc'" in str(err.value) and "more than once" in str(err.value)
    got = read_attributes(path, on_bad_rows="skip")
    assert got["pid"].tolist() == [df.pid[0], df.pid[2]]


def test_no_delimiter_or_empty(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("")
    with pytest.raises(AttributeFileError, match="empty"):
        read_attributes(path)
    path.write_text("pid\n1\n")
    with pytest.raises(AttributeFileError, match="delimiter"):
        read_attributes(path)


_ALIAS_CHOICES = {canon: sorted(a for a, c in HEADER_ALIASES.items() if c == canon) for canon in ("pid", *ATTRIBUTE_COLUMNS)}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_reader_property(tmp_path, data):
    n = data.draw(st.integers(1, 12))
    pids = data.draw(st.lists(st.integers(0, 99999), min_size=n, max_size=n, unique=True))
    df = pd.DataFrame({"pid": sorted(pids)})
    for col in ATTRIBUTE_COLUMNS:
        df[col] = data.draw(st.lists(st.sampled_from(sorted(ATTRIBUTE_CODES[col])), min_size=n, max_size=n))
    df = df.astype({"pid": "int64", **{c: "int8" for c in ATTRIBUTE_COLUMNS}})
    sep = data.draw(st.sampled_from(["\t", ",", ";", "|"]))
    header = [data.draw(st.sampled_from(_ALIAS_CHOICES[c])) for c in ("pid", *ATTRIBUTE_COLUMNS)]
    header = [h.replace("_", data.draw(st.sampled_from(["_", " ", "-"]))) for h in header]
    text = _text(df.sample(frac=1, random_state=0), sep=sep, header=header, pad=data.draw(st.booleans()))
    if data.draw(st.booleans()):
        text = text.replace("\n", "\r\n")
    raw = text.encode()
    if data.draw(st.booleans()):
        raw = b"\xef\xbb\xbf" + raw
    path = tmp_path / "prop.csv"
    path.write_bytes(raw)
    pd.testing.assert_frame_equal(read_attributes(path), df)


def test_missing_file_says_what_it_is_and_where_it_goes(tmp_path):
    missing = tmp_path / "FineGPR_attributes.csv"
    with pytest.raises(FileNotFoundError) as err:
        read_attributes(missing)
    message = str(err.value)
    assert str(missing) in message and "captions.file" in message
    assert f"pid,{','.join(ATTRIBUTE_COLUMNS)}" in message and "docs/captions.md" in message
    assert "data/archives/FineGPR_attributes.csv" in message and "convert it" in message
    assert "Errno" not in message
