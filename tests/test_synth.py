"""SynthPed: determinism, file layouts, attribute table, protocol structure, rendering semantics."""

from __future__ import annotations

import csv
import hashlib
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from dmf_core.data.captions.attributes import ATTRIBUTE_COLUMNS
from dmf_core.data.synthped import world as synth
from dmf_core.data.synthped.world import (
    FINEGPR_NAME_RE,
    MARKET_NAME_RE,
    STYLES,
    render_person,
    sample_identity,
    write_finegpr,
    write_market_domain,
)

H, W = 64, 32


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def finegpr(root: Path, seed: int = 0, ids: int = 4, per_id: int = 6) -> Path:
    write_finegpr(root, ids=ids, images_per_id=per_id, height=H, width=W, seed=seed, namespace="synthped")
    return root


def market(root: Path, seed: int = 0, style: str = "market", name: str = "sp_market") -> Path:
    write_market_domain(root, name=name, style=style, train_ids=3, test_ids=4, height=H, width=W, seed=seed)
    return root


@pytest.fixture(scope="module")
def fg(tmp_path_factory) -> Path:
    return finegpr(tmp_path_factory.mktemp("fg"))


@pytest.fixture(scope="module")
def mk(tmp_path_factory) -> Path:
    return market(tmp_path_factory.mktemp("mk"))


def parse_market(root: Path, sub: str) -> list[tuple[int, int, str]]:
    out = []
    for p in sorted((root / sub).iterdir()):
        m = re.match(MARKET_NAME_RE, p.name)
        assert m, p.name
        out.append((int(m.group(1)), int(m.group(2)), p.name))
    return out


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes(tmp_path, fg, mk):
    assert tree_digest(finegpr(tmp_path / "a")) == tree_digest(fg)
    assert tree_digest(market(tmp_path / "b")) == tree_digest(mk)


def test_different_seed_differs(tmp_path, fg, mk):
    a, b = tree_digest(finegpr(tmp_path / "a", seed=1)), tree_digest(fg)
    assert a != b
    assert tree_digest(market(tmp_path / "m", seed=1)) != tree_digest(mk)


def test_identity_is_pure_function_of_seed_namespace_pid():
    assert sample_identity(0, "x", 5) == sample_identity(0, "x", 5)
    assert sample_identity(0, "x", 5) != sample_identity(0, "y", 5)
    assert sample_identity(0, "x", 5) != sample_identity(1, "x", 5)


def test_no_torch_import():
    code = "import sys, dmf_core.data.synthped.world; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- FineGPR layout


def test_finegpr_layout(fg):
    files = sorted((fg / "FineGPR").rglob("*.jpg"))
    assert len(files) == 4 * 6
    per_id = defaultdict(list)
    for p in files:
        m = re.match(FINEGPR_NAME_RE, p.name)
        assert m, p.name
        assert p.parent.name == m.group(1)
        pid, v, w, il, s = (int(g) for g in m.groups())
        assert 1 <= v <= 36 and 1 <= w <= 7 and 1 <= il <= 7 and 1 <= s <= 9
        per_id[pid].append((v, w, il))
    assert sorted(per_id) == [1, 3, 5, 7]  # non-contiguous like FineGPR
    for combos in per_id.values():
        assert len(set(combos)) == 6
        assert len({v for v, _, _ in combos}) == 6  # spread over viewpoints
    from PIL import Image

    with Image.open(files[0]) as im:
        assert im.size == (W, H) and im.mode == "RGB"


def test_attributes_csv(fg):
    with open(fg / "attributes.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["pid", *ATTRIBUTE_COLUMNS]
    assert [r[0] for r in rows[1:]] == ["0001", "0003", "0005", "0007"]
    for r in rows[1:]:
        assert len(r) == 14
        for col, val in zip(ATTRIBUTE_COLUMNS, r[1:]):
            assert re.fullmatch(r"\d\d", val), (col, val)
            hi = 9 if col in ("upper_color", "lower_color") else 3 if col == "age" else 2
            assert 1 <= int(val) <= hi, (col, val)
        ident = sample_identity(0, "synthped", int(r[0]))
        assert [int(v) for v in r[1:]] == [ident.attributes[c] for c in ATTRIBUTE_COLUMNS]


def test_every_attribute_value_occurs_in_64_ids():
    ids = [sample_identity(0, "synthped", 2 * i + 1) for i in range(64)]
    for col in ATTRIBUTE_COLUMNS:
        hi = 9 if col in ("upper_color", "lower_color") else 3 if col == "age" else 2
        seen = {t.attributes[col] for t in ids}
        assert seen == set(range(1, hi + 1)), col
    males = sum(t.attributes["gender"] == 1 for t in ids)
    assert 30 <= males <= 56  # ~67% male like FineGPR


# --------------------------------------------------------------------------- Market layout


def test_market_layout_and_protocol(mk):
    train = parse_market(mk, "bounding_box_train")
    query = parse_market(mk, "query")
    gallery = parse_market(mk, "bounding_box_test")
    train_ids = {p for p, _, _ in train}
    test_ids = {p for p, _, _ in query}
    assert train_ids == {1, 2, 3}
    assert test_ids == {4, 5, 6, 7}
    assert all(1 <= c <= STYLES["market"].cameras for _, c, _ in train + query + gallery)
    assert 30 <= len(train) <= 42  # 10-14 images per id
    gal_ids = {p for p, _, _ in gallery}
    assert -1 in gal_ids and 0 in gal_ids  # junk and distractors
    assert gal_ids - {-1, 0} == test_ids
    assert not (train_ids & gal_ids)
    for pid, cam, name in query:
        same = [g for g in gallery if g[0] == pid and g[1] == cam]
        other = [g for g in gallery if g[0] == pid and g[1] != cam]
        assert same, f"{name}: no same-camera gallery image (protocol removal not exercised)"
        assert other, f"{name}: no cross-camera match"
    per_id_cams = defaultdict(set)
    for pid, cam, _ in query:
        per_id_cams[pid].add(cam)
    assert all(len(c) == 2 for c in per_id_cams.values())  # one query per camera, two cameras


def test_cuhk_has_two_cameras(tmp_path):
    root = market(tmp_path / "c", style="cuhk", name="sp_cuhk")
    cams = {c for sub in ("bounding_box_train", "query", "bounding_box_test") for _, c, _ in parse_market(root, sub)}
    assert cams == {1, 2}


def test_domains_have_different_people():
    a = sample_identity(0, "sp_market", 1)
    b = sample_identity(0, "sp_cuhk", 1)
    assert (a.skin, a.upper_rgb, a.lower_rgb, a.pattern_rgb) != (b.skin, b.upper_rgb, b.lower_rgb, b.pattern_rgb)


def test_unknown_style_is_named():
    with pytest.raises(ValueError, match="nope"):
        write_market_domain(Path("/nonexistent"), name="x", style="nope", train_ids=1, test_ids=1,
                            height=H, width=W, seed=0)


# --------------------------------------------------------------------------- rendering semantics


def render(ident, viewpoint=28, style=None, **kw) -> np.ndarray:
    args = dict(weather=5, illumination=4, scene=1, height=128, width=64, style=style,
                rng=np.random.default_rng(0))
    args.update(kw)
    return np.asarray(render_person(ident, viewpoint=viewpoint, **args), dtype=np.int16)


def test_viewpoint_changes_image():
    ident = sample_identity(0, "synthped", 1)
    front, back, side = render(ident, 28), render(ident, 10), render(ident, 1)  # 0, 180, 90 deg
    assert np.abs(front - back).mean() > 1.0
    assert np.abs(front - side).mean() > 1.0


def test_glasses_visible_from_front_only():
    base = dict(sample_identity(0, "synthped", 1).attributes, glasses=2)
    plain = sample_identity(0, "synthped", 1, attributes=base)
    spectacled = sample_identity(0, "synthped", 1, attributes=dict(base, glasses=1))
    assert np.abs(render(plain, 28) - render(spectacled, 28)).sum() > 0  # front
    assert np.array_equal(render(plain, 10), render(spectacled, 10))  # back


def test_equal_attributes_render_differently():
    a = sample_identity(0, "synthped", 1)
    b = sample_identity(0, "synthped", 3, attributes=a.attributes)
    assert a.attributes == b.attributes
    assert np.abs(render(a) - render(b)).mean() > 2.0


def test_conditions_and_style_change_image():
    ident = sample_identity(0, "synthped", 1)
    ref = render(ident)
    assert np.abs(ref - render(ident, weather=4)).mean() > 2.0  # fog
    assert np.abs(ref - render(ident, illumination=1)).mean() > 10.0  # midnight
    assert np.abs(ref - render(ident, style=STYLES["cuhk"], camera=1)).mean() > 5.0


def test_contact_sheet(tmp_path):
    out = synth.contact_sheet(tmp_path / "s.png", height=64, width=32)
    assert out.exists() and out.stat().st_size < 300_000
