"""Caption generation: faithfulness, determinism, variety, grammar, bad input, COCO round trip."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmf_core.data.captions import codes
from dmf_core.data.captions import generate as cap
from dmf_core.data.captions.attributes import (
    ATTRIBUTE_CODES,
    ATTRIBUTE_COLUMNS,
    read_attributes,
    write_attributes,
)


def make_attributes(n_ids: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    pids = np.sort(rng.choice(np.arange(1, 4 * n_ids), size=n_ids, replace=False)).astype("int64")
    return pd.DataFrame({"pid": pids, **{c: rng.choice(list(ATTRIBUTE_CODES[c]), size=n_ids).astype("int8")
                                          for c in ATTRIBUTE_COLUMNS}})


def make_manifest(pids, per_id: int = 24, seed: int = 0, with_conditions: bool = True) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in pids:
        combos = set()
        while len(combos) < per_id:
            combos.add((int(rng.integers(1, 37)), int(rng.integers(1, 8)), int(rng.integers(1, 8)),
                        int(rng.integers(1, 10))))
        for v, w, il, s in sorted(combos):
            rows.append((f"{p:04d}/{p:04d}_c{v:02d}_w{w:02d}_l{il:02d}_p{s:02d}.jpg", "train", int(p), v - 1,
                         "synthped", v, w, il, s))
    man = pd.DataFrame(rows, columns=["image_id", "split", "pid", "camid", "dataset", "viewpoint", "weather",
                                      "illumination", "scene"])
    return man if with_conditions else man.drop(columns=list(cap.CONDITION_COLUMNS))


@pytest.fixture(scope="module")
def inputs():
    attrs = make_attributes()
    return make_manifest(attrs["pid"]), attrs


@pytest.fixture(scope="module")
def result(inputs):
    man, attrs = inputs
    return cap.generate_captions(man, attrs, per_image=3, seed=7, viewpoint_words=cap.DEFAULT_VIEWPOINT_WORDS)


def test_shape_and_order(inputs, result):
    man, _ = inputs
    df = result.captions
    assert list(df.columns) == ["image_id", "caption_idx", "caption"]
    assert len(df) == 3 * len(man)
    assert df["image_id"].is_monotonic_increasing
    assert df.groupby("image_id")["caption_idx"].apply(list).map(lambda x: x == [0, 1, 2]).all()
    assert set(df["image_id"]) == set(man["image_id"])
    assert result.metrics["images_captioned"] == len(man)
    assert result.metrics["captions"] == len(df)


def test_faithfulness_every_attribute_recoverable(inputs, result):
    man, attrs = inputs
    truth = attrs.set_index("pid")
    cond = man.set_index("image_id")
    views = cap.viewpoint_word_table(cap.DEFAULT_VIEWPOINT_WORDS)
    sample = result.captions.sample(n=800, random_state=0)
    for image_id, text in zip(sample["image_id"], sample["caption"], strict=True):
        got = cap.parse_caption_attributes(text)  # strict: raises on contradictory phrases
        row = cond.loc[image_id]
        expected = {c: int(truth.at[int(row["pid"]), c]) for c in ATTRIBUTE_COLUMNS}
        expected.update(weather=int(row["weather"]), illumination=int(row["illumination"]),
                        scene=codes.SCENE[int(row["scene"])], viewpoint=views[int(row["viewpoint"]) - 1])
        assert got == expected, text


def test_no_contradictions_and_pronoun_agreement(inputs, result):
    _, attrs = inputs
    gender = attrs.set_index("pid")["gender"]
    df = result.captions
    pid = df["image_id"].str.slice(0, 4).astype(int)
    for text, p in zip(df["caption"], pid, strict=True):
        low = text.lower()
        if gender[p] == 1:
            assert not re.search(r"\b(she|her|woman|female|girl)\b", low), text
        else:
            assert not re.search(r"\b(he|his|man|male|boy)\b", low), text
        for item in ("hat", "bag"):
            assert not (re.search(rf"\bno {item}\b", low) and re.search(rf"(?<!without )\ba {item}\b", low)), text
        assert not ("no glasses" in low and re.search(r"(?<!no )\bglasses\b", low)), text
        assert not ("dress" in low.replace("dressed", "") and re.search(r"\b(trousers|pants)\b", low)), text
        assert not ("boots" in low and "shoes" in low), text


def test_parser_flags_contradictions():
    with pytest.raises(cap.CaptionParseError, match="hat"):
        cap.parse_caption_attributes("A man who wears no hat and a hat.")
    with pytest.raises(cap.CaptionParseError, match="gender"):
        cap.parse_caption_attributes("A woman; he carries a bag.")
    assert cap.parse_caption_attributes("A man wearing glasses and a t-shirt",
                                        strict=True)["glasses"] == 1
    lenient = cap.parse_caption_attributes("wears no hat and a hat", strict=False)
    assert "hat" not in lenient


def test_garment_nouns_follow_attributes(inputs, result):
    _, attrs = inputs
    truth = attrs.set_index("pid")
    df = result.captions.iloc[::7]
    for image_id, text in zip(df["image_id"], df["caption"], strict=True):
        a = truth.loc[int(image_id[:4])]
        low = text.lower()
        assert (" dress" in low.replace("dressed", "")) == (a["dress"] == 1), text
        assert ("boots" in low) == (a["boots"] == 1), text
        assert bool(re.search(r"\b(coat|long top)\b", low)) == (a["top_length"] == 1), text
        sleeve = "short" if a["short_sleeve"] == 1 else "long"
        assert re.search(rf"\b{sleeve}(-sleeved| sleeves)\b", low), text
        if "t-shirt" in low:
            assert a["short_sleeve"] == 1 and a["top_length"] == 2


def test_article_agreement(result):
    text = " ".join(result.captions["caption"].str.lower())
    bad_a = re.findall(r"\ba (?=[aeiou])\w+", text)
    bad_an = re.findall(r"\ban (?![aeiou])\w+", text)
    assert not bad_a, bad_a[:5]
    assert not bad_an, bad_an[:5]
    assert "an adult" in text
    assert "an elderly" in text or "an older" in text
    assert re.search(r"\ba (teenage|short-sleeved|long-sleeved)\b", text)


def test_captions_start_capitalised_and_end_with_period(result):
    caps = result.captions["caption"]
    assert caps.str.match(r"^[A-Z]").all()
    assert caps.str.endswith(".").all()
    assert not caps.str.contains(r"\s{2,}|\s[,.;:]").any()


def test_determinism_and_order_independence(inputs, result):
    man, attrs = inputs
    again = cap.generate_captions(man, attrs, per_image=3, seed=7, viewpoint_words=cap.DEFAULT_VIEWPOINT_WORDS)
    pd.testing.assert_frame_equal(again.captions, result.captions)
    shuffled = man.sample(frac=1.0, random_state=3).reset_index(drop=True)
    again = cap.generate_captions(shuffled, attrs.sample(frac=1.0, random_state=1), per_image=3, seed=7,
                                  viewpoint_words=cap.DEFAULT_VIEWPOINT_WORDS)
    pd.testing.assert_frame_equal(again.captions, result.captions)
    other = cap.generate_captions(man, attrs, per_image=3, seed=8, viewpoint_words=cap.DEFAULT_VIEWPOINT_WORDS)
    assert (other.captions["caption"] != result.captions["caption"]).mean() > 0.5


def test_variety(result):
    df = result.captions
    used = result.metrics["templates_used"]
    assert sum(1 for v in used.values() if v > 0) == len(cap.TEMPLATES)
    per_image_distinct = df.groupby("image_id")["caption"].nunique()
    assert (per_image_distinct == 3).all()
    assert df["caption"].nunique() > 0.9 * len(df)
    assert result.metrics["unique_captions"] == df["caption"].nunique()
    starts = df["caption"].str.split().str[0].nunique()
    assert starts >= 5


def test_metrics(result, inputs):
    m = result.metrics
    assert m["vocabulary_size"] == len({w.strip(",.;:").lower() for c in result.captions["caption"]
                                        for w in c.split()} - {""})
    words = result.captions["caption"].str.split().str.len()
    assert m["words_per_caption"]["min"] == words.min() and m["words_per_caption"]["max"] == words.max()
    assert m["words_per_caption"]["mean"] == pytest.approx(words.mean(), abs=0.01)
    assert all(v == 1.0 for v in m["attribute_coverage"].values())
    assert all(v == 1.0 for v in m["attribute_correct"].values())
    assert m["contradictory_captions_in_sample"] == 0
    assert sum(m["attribute_values"]["gender"].values()) == m["ids_captioned"]
    json.dumps(m)
    generic = cap.caption_metrics(result.captions)
    assert generic["unique_captions"] == m["unique_captions"]
    man, attrs = inputs  # with the truth of the attributes (not of the conditions) at hand
    checked = cap.caption_metrics(result.captions, attrs, man)
    assert set(checked["attribute_correct"]) == set(ATTRIBUTE_COLUMNS)
    assert all(v == 1.0 for v in checked["attribute_correct"].values())
    assert generic["vocabulary_size"] == m["vocabulary_size"]
    assert generic["words_per_caption"] == m["words_per_caption"]


def test_viewpoint_mapping():
    words = cap.viewpoint_word_table(cap.DEFAULT_VIEWPOINT_WORDS)
    assert codes.viewpoint_angle(28) == 0 and codes.viewpoint_angle(1) == 90 and codes.viewpoint_angle(10) == 180
    assert [codes.angle_to_viewpoint(codes.viewpoint_angle(c)) for c in range(1, 37)] == list(range(1, 37))
    with pytest.raises(ValueError, match="expected 1..36"):
        codes.viewpoint_angle(37)
    assert words[28 - 1] == "front" and words[10 - 1] == "back" and words[1 - 1] == "right"
    assert words[19 - 1] == "left" and words[24 - 1] == "front" and words[33 - 1] == "right"
    eight = {"front": [337.5, 22.5], "front-right": [22.5, 67.5], "right": [67.5, 112.5],
             "back-right": [112.5, 157.5], "back": [157.5, 202.5], "back-left": [202.5, 247.5],
             "left": [247.5, 292.5], "front-left": [292.5, 337.5]}
    assert set(cap.viewpoint_word_table(eight)) == set(eight)
    with pytest.raises(ValueError, match=r"c01 \(90 deg\) matches no word"):
        cap.viewpoint_word_table({"front": [315, 45], "back": [135, 225], "left": [225, 315]})
    with pytest.raises(ValueError, match="several words"):
        cap.viewpoint_word_table({"front": [300, 45], "right": [45, 135], "back": [135, 225], "left": [225, 315]})


def test_custom_viewpoint_words_recoverable(inputs):
    man, attrs = inputs
    eight = {"front": [337.5, 22.5], "front-right": [22.5, 67.5], "right": [67.5, 112.5],
             "back-right": [112.5, 157.5], "back": [157.5, 202.5], "back-left": [202.5, 247.5],
             "left": [247.5, 292.5], "front-left": [292.5, 337.5]}
    res = cap.generate_captions(man.head(300), attrs[attrs.pid.isin(man.head(300).pid)], per_image=2, seed=0,
                                viewpoint_words=eight)
    assert res.metrics["attribute_correct"]["viewpoint"] == 1.0


def test_conditions_from_file_names(inputs, result):
    man, attrs = inputs
    bare = man.drop(columns=list(cap.CONDITION_COLUMNS))
    res = cap.generate_captions(bare, attrs, per_image=3, seed=7, viewpoint_words=cap.DEFAULT_VIEWPOINT_WORDS)
    pd.testing.assert_frame_equal(res.captions, result.captions)


def test_bad_codes_fail_then_skip(inputs):
    man, attrs = inputs
    bad = attrs.copy()
    bad.loc[[2, 5], "hat"] = 7
    with pytest.raises(cap.CaptionInputError, match=r"2 row\(s\) with unknown codes") as err:
        cap.generate_captions(man, bad, per_image=1, seed=0)
    assert f"pid={bad.pid[2]!r}" in str(err.value) or str(bad.pid[2]) in str(err.value)
    res = cap.generate_captions(man, bad, per_image=1, seed=0, on_bad_rows="skip")
    assert res.skipped["attribute_rows_bad"] == 2
    assert res.skipped["images_missing_attributes"] == int(man.pid.isin(bad.pid[[2, 5]]).sum())
    assert res.metrics["skipped"]["ids_missing_attributes"] == 2
    assert res.metrics["ids_captioned"] == len(attrs) - 2


def test_missing_attributes_and_orphan_ids(inputs):
    man, attrs = inputs
    with pytest.raises(cap.CaptionInputError, match=r"1 id\(s\) in the manifest have no attributes \(24 image"):
        cap.generate_captions(man, attrs.iloc[1:], per_image=1, seed=0)
    with pytest.raises(cap.CaptionInputError, match=r"1 id\(s\) have attributes but no images"):
        cap.generate_captions(man[man.pid != attrs.pid.iloc[-1]], attrs, per_image=1, seed=0)
    res = cap.generate_captions(man[man.pid != attrs.pid.iloc[-1]], attrs, per_image=1, seed=0, on_bad_rows="skip")
    assert res.metrics["skipped"]["ids_without_images"] == 1


def test_malformed_file_names_and_codes(inputs):
    man, attrs = inputs
    bare = man.drop(columns=list(cap.CONDITION_COLUMNS)).copy()
    bare.loc[3, "image_id"] = "0001/garbage.jpg"
    bare.loc[4, "image_id"] = bare.loc[4, "image_id"].replace("_w0", "_w9")  # weather 9x: out of range
    with pytest.raises(cap.CaptionInputError, match=r"2 image\(s\) with malformed") as err:
        cap.generate_captions(bare, attrs, per_image=1, seed=0)
    assert "garbage.jpg" in str(err.value)
    res = cap.generate_captions(bare, attrs, per_image=1, seed=0, on_bad_rows="skip")
    assert res.metrics["skipped"]["images_bad_conditions"] == 2 and len(res.captions) == len(man) - 2
    cols = man.copy()
    cols.loc[0, "viewpoint"] = 37
    with pytest.raises(cap.CaptionInputError, match="viewpoint"):
        cap.generate_captions(cols, attrs, per_image=1, seed=0)


def test_coco_round_trip(tmp_path, inputs, result):
    man, _ = inputs
    pq_path, js_path = tmp_path / "c" / "finegpr.parquet", tmp_path / "c" / "finegpr_coco.json"
    cap.write_captions(result, pq_path, js_path, chunk=1000)
    back = pq.read_table(pq_path).to_pandas()
    pd.testing.assert_frame_equal(back, result.captions, check_dtype=False)
    coco = json.loads(js_path.read_text())
    assert len(coco["images"]) == len(man) and len(coco["annotations"]) == len(result.captions)
    assert coco["images"][0] == {"id": 1, "file_name": result.captions["image_id"].iloc[0]}
    assert {"id", "image_id", "caption"} == set(coco["annotations"][0])
    pd.testing.assert_frame_equal(cap.read_finegpr_c(js_path, man), result.captions, check_dtype=False)
    first = js_path.read_bytes()
    cap.write_captions(result.captions.sample(frac=1.0, random_state=0), pq_path, js_path)
    assert js_path.read_bytes() == first  # deterministic, sorted on write


def test_finegpr_c_reader_basenames_and_escaping(tmp_path, inputs):
    man, _ = inputs
    names = man["image_id"].iloc[:3].tolist()
    coco = {"images": [{"id": 10 + i, "file_name": n.split("/")[-1]} for i, n in enumerate(names)],
            "annotations": [{"id": 5, "image_id": 11, "caption": 'He said "hi"\\ then\nleft. '},
                            {"id": 2, "image_id": 11, "caption": "First caption."},
                            {"id": 3, "image_id": 10, "caption": "Only one."}]}
    src = tmp_path / "captions_train2017.json"
    src.write_text(json.dumps(coco))
    df = cap.read_finegpr_c(src, man)
    assert df["image_id"].tolist() == [names[0], names[1], names[1]]
    assert df["caption_idx"].tolist() == [0, 0, 1]
    assert df["caption"].tolist()[1:] == ["First caption.", 'He said "hi"\\ then\nleft.']
    cap.write_captions(df, tmp_path / "o.parquet", tmp_path / "o.json")
    pd.testing.assert_frame_equal(cap.read_finegpr_c(tmp_path / "o.json", man), df, check_dtype=False)
    coco["images"].append({"id": 99, "file_name": "nowhere.jpg"})
    src.write_text(json.dumps(coco))
    with pytest.raises(cap.CaptionInputError, match="nowhere.jpg"):
        cap.read_finegpr_c(src, man)
    assert len(cap.read_finegpr_c(src, man, on_bad_rows="skip")) == 3
    metrics = cap.caption_metrics(df)
    assert metrics["captions"] == 3 and metrics["images_captioned"] == 2


def test_with_attribute_file(tmp_path, inputs):
    """The reader's output feeds the generator (the stage's path), SynthPed-style canonical file."""
    man, attrs = inputs
    path = tmp_path / "attributes.csv"
    write_attributes(attrs, path)
    res = cap.generate_captions(man, read_attributes(path), per_image=1, seed=0)
    assert len(res.captions) == len(man) and res.metrics["skipped"]["attribute_rows_bad"] == 0


def test_bad_params(inputs):
    man, attrs = inputs
    with pytest.raises(ValueError, match="on_bad_rows"):
        cap.generate_captions(man, attrs, per_image=1, seed=0, on_bad_rows="ignore")
    with pytest.raises(ValueError, match="per_image"):
        cap.generate_captions(man, attrs, per_image=0, seed=0)


def test_synthped_end_to_end(tmp_path):
    """SynthPed's FineGPR-format output -> layout parser -> attribute reader -> captions -> files."""
    synth = pytest.importorskip("dmf_core.data.synthped.world")
    layouts = pytest.importorskip("dmf_core.data.sources.layouts")
    synth.write_finegpr(tmp_path, ids=4, images_per_id=3, height=32, width=16, seed=0)
    man = layouts.parse_finegpr(tmp_path, "synthped")
    res = cap.generate_captions(man, read_attributes(tmp_path / "attributes.csv"), per_image=2, seed=0,
                                viewpoint_words=cap.DEFAULT_VIEWPOINT_WORDS)
    assert len(res.captions) == 2 * len(man) == 24
    assert all(v == 1.0 for v in res.metrics["attribute_correct"].values())
    cap.write_captions(res, tmp_path / "out" / "finegpr.parquet", tmp_path / "out" / "finegpr_coco.json")
    assert len(cap.read_finegpr_c(tmp_path / "out" / "finegpr_coco.json", man)) == 24


_attr_codes = {c: st.sampled_from(sorted(ATTRIBUTE_CODES[c])) for c in ATTRIBUTE_COLUMNS}


_conditions = st.tuples(st.integers(1, 36), st.integers(1, 7), st.integers(1, 7), st.integers(1, 9))


@settings(max_examples=50, deadline=None)
@given(people=st.lists(st.tuples(st.fixed_dictionaries(_attr_codes), _conditions), min_size=1, max_size=6),
       view=st.sampled_from(["front", "back", "left", "right", "front-left"]), seed=st.integers(0, 2**31))
def test_any_attribute_combination_round_trips(people, view, seed):
    """Every template states every attribute and condition of any person, parseably and with the
    right articles: one image per person, captioned with all templates (variants by the seed)."""
    attrs = pd.DataFrame([{"pid": pid, **a} for pid, (a, _) in enumerate(people, 1)])
    man = pd.DataFrame([(f"{pid}.jpg", pid, *codes) for pid, (_, codes) in enumerate(people, 1)],
                       columns=["image_id", "pid", *cap.CONDITION_COLUMNS])
    res = cap.generate_captions(man, attrs, per_image=len(cap.TEMPLATES), seed=seed,
                                viewpoint_words={view: [0, 360]})  # every viewpoint is called `view`
    assert len(res.captions) == len(people) * len(cap.TEMPLATES)
    assert res.metrics["templates_used"] == {str(t): len(people) for t in range(len(cap.TEMPLATES))}
    for image_id, text in zip(res.captions["image_id"], res.captions["caption"], strict=True):
        a, (_, weather, illumination, scene) = people[int(image_id.split(".")[0]) - 1]
        expected = dict(a, weather=weather, illumination=illumination, scene=codes.SCENE[scene], viewpoint=view)
        assert cap.parse_caption_attributes(text) == expected, text
        assert not re.search(r"\ba [aeiou]|\ban [^aeiou\s]", text.lower()), text


def test_no_torch_import():
    import subprocess
    import sys

    code = ("import sys, dmf_core.data.captions.generate, dmf_core.data.captions.attributes; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_person_content_states_the_identity_and_viewpoint_only(inputs):
    """captions.content: person leaves the conditions out: no weather, time of day or scene."""
    man, attrs = inputs
    res = cap.generate_captions(man, attrs, per_image=2, seed=7, viewpoint_words=cap.DEFAULT_VIEWPOINT_WORDS,
                                content="person")
    truth = attrs.set_index("pid")
    for text, pid in zip(res.captions["caption"].head(200), man.set_index("image_id").loc[
            res.captions["image_id"].head(200), "pid"]):
        parsed = cap.parse_caption_attributes(text)
        assert {k: parsed[k] for k in cap.ATTRIBUTE_COLUMNS} == truth.loc[pid, list(cap.ATTRIBUTE_COLUMNS)].to_dict()
        assert "viewpoint" in parsed and not {"weather", "illumination", "scene"} & set(parsed), text
    with pytest.raises(ValueError, match="captions.content"):
        cap.generate_captions(man, attrs, per_image=1, seed=0, content="weather")
