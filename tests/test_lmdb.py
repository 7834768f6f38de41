"""LMDB packing and checking: round trip, byte-identical rebuilds, atomicity, corrupt input."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dmf_core.data.store import lmdb_store
from dmf_core.data.store.lmdb_store import LmdbReader, check_lmdb, pack_split


def make_images(root: Path, ids: int = 6, per_id: int = 5, size=(32, 16), seed: int = 0) -> pd.DataFrame:
    """Small JPEGs under root/<pid>/<n>.jpg; returns manifest rows (shuffled)."""
    rng = np.random.default_rng(seed)
    rows = []
    for pid in range(ids):
        for n in range(per_id):
            rel = f"{pid + 100:04d}/{pid + 100:04d}_c{n % 3}_{n:03d}.jpg"
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            arr = np.kron(rng.integers(0, 255, (size[0] // 4, size[1] // 4, 3)), np.ones((4, 4, 1)))
            Image.fromarray(arr.astype(np.uint8)).save(path, quality=90)
            rows.append({"image_id": rel, "split": "train", "pid": pid + 100, "camid": n % 3, "dataset": "toy"})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture()
def toy(tmp_path):
    root = tmp_path / "raw"
    return root, make_images(root)


def test_round_trip(toy, tmp_path):
    root, rows = toy
    out = tmp_path / "lmdb" / "toy-train.lmdb"
    rep = pack_split(rows, root, out, relabel=True, params_fingerprint={"resize": None})
    assert rep.count == len(rows) and rep.skipped == [] and rep.bytes > 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["toy-train.lmdb", "toy-train.parquet"]
    reader = LmdbReader(out, expected_meta={"resize": None})
    side = reader.sidecar
    assert len(reader) == len(rows)
    assert side["image_id"].tolist() == sorted(rows["image_id"])  # key order = image_id order
    assert side["key"].tolist() == [f"{i:08d}" for i in range(len(rows))]
    assert side["label"].tolist() == [int(p) - 100 for p in side["pid"]]  # relabel in sorted pid order
    for i in range(len(reader)):
        data = reader.get_bytes(i)
        assert data == (root / side["image_id"][i]).read_bytes()
        assert hashlib.sha1(data).hexdigest() == side["sha1"][i]
    assert (side["height"] == 32).all() and (side["width"] == 16).all()
    with pytest.raises(IndexError):
        reader.get_bytes(len(rows))


def test_not_relabelled_and_resize(toy, tmp_path):
    root, rows = toy
    out = tmp_path / "toy-query.lmdb"
    pack_split(rows, root, out, resize=[24, 12])
    reader = LmdbReader(out, expected_meta={"resize": [24, 12]})
    assert (reader.sidecar["label"] == -1).all()
    im = Image.open(io.BytesIO(reader.get_bytes(0)))
    assert im.size == (12, 24) and im.format == "JPEG"
    assert (reader.sidecar["height"] == 24).all()


def test_byte_identical_rebuild(toy, tmp_path):
    root, rows = toy
    a, b = tmp_path / "a" / "t.lmdb", tmp_path / "b" / "t.lmdb"
    pack_split(rows, root, a, relabel=True, params_fingerprint={"resize": None})
    pack_split(rows.sample(frac=1.0, random_state=7), root, b, relabel=True, params_fingerprint={"resize": None})
    assert sha256(a) == sha256(b)
    assert sha256(a.with_suffix(".parquet")) == sha256(b.with_suffix(".parquet"))
    pack_split(rows, root, a, relabel=True, params_fingerprint={"resize": None})  # rebuild in place
    assert sha256(a) == sha256(b)
    assert not list(a.parent.glob("*-lock")) and not list(a.parent.glob("*.partial"))


def test_interrupted_pack_leaves_no_final_file(toy, tmp_path):
    root, rows = toy
    rows_path = tmp_path / "rows.parquet"
    rows.to_parquet(rows_path)
    out = tmp_path / "lmdb" / "t.lmdb"
    script = textwrap.dedent(f"""
        import os, pandas as pd
        from pathlib import Path
        from dmf_core.data.store import lmdb_store
        lmdb_store.COMMIT_EVERY = 4
        real, calls = lmdb_store._load_one, [0]
        def dying(*a):
            calls[0] += 1
            if calls[0] == 20:
                os._exit(9)  # a kill: no cleanup, no exception handlers
            return real(*a)
        lmdb_store._load_one = dying
        lmdb_store.pack_split(pd.read_parquet({str(rows_path)!r}), Path({str(root)!r}), Path({str(out)!r}),
                              threads=1)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    assert not out.exists() and not out.with_suffix(".parquet").exists()
    assert lmdb_store.partial_path(out).exists()  # only the temporary file is left
    with pytest.raises(ValueError, match="missing.*interrupted"):
        check_lmdb(out)
    pack_split(rows, root, out)  # the next run discards the partial file and starts clean
    assert out.exists() and not lmdb_store.partial_path(out).exists()
    clean = tmp_path / "clean" / "t.lmdb"
    pack_split(rows, root, clean)
    assert sha256(out) == sha256(clean)


def _corrupt(root: Path, rows: pd.DataFrame) -> list[str]:
    ids = sorted(rows["image_id"])
    trunc, garbage, missing = ids[3], ids[7], ids[11]
    data = (root / trunc).read_bytes()
    (root / trunc).write_bytes(data[: len(data) // 2])
    (root / garbage).write_bytes(b"this is not an image" * 10)
    (root / missing).unlink()
    return [trunc, garbage, missing]


def test_corrupt_fail(toy, tmp_path):
    root, rows = toy
    bad = _corrupt(root, rows)
    out = tmp_path / "t.lmdb"
    with pytest.raises(ValueError, match=bad[0].replace("/", ".")):
        pack_split(rows, root, out, on_corrupt="fail")
    assert not out.exists() and not lmdb_store.partial_path(out).exists()


def test_corrupt_skip(toy, tmp_path):
    root, rows = toy
    bad = _corrupt(root, rows)
    out = tmp_path / "t.lmdb"
    rep = pack_split(rows, root, out, on_corrupt="skip", relabel=True)
    assert sorted(i for i, _ in rep.skipped) == sorted(bad)
    assert rep.count == len(rows) - 3
    report = json.loads(lmdb_store.corrupt_report_path(out).read_text())
    assert sorted(r["image_id"] for r in report["skipped"]) == sorted(bad)
    reasons = dict(rep.skipped)
    assert "unreadable" in reasons[bad[2]] and "decode" in reasons[bad[1]]
    reader = LmdbReader(out)
    assert not set(bad) & set(reader.sidecar["image_id"])
    assert sorted(set(reader.sidecar["label"])) == list(range(6))


def test_check_lmdb_errors(toy, tmp_path):
    root, rows = toy
    with pytest.raises(ValueError, match="nothere.lmdb: LMDB missing"):
        check_lmdb(tmp_path / "nothere.lmdb")
    out = tmp_path / "t.lmdb"
    pack_split(rows, root, out, params_fingerprint={"resize": None})
    check_lmdb(out, {"resize": None})

    with pytest.raises(ValueError, match=r"t.lmdb: built with resize=None.*\[256, 128\]"):
        check_lmdb(out, {"resize": [256, 128]})
    with pytest.raises(ValueError, match="built without 'other'"):
        check_lmdb(out, {"other": 1})

    side = out.with_suffix(".parquet")
    good_side = side.read_bytes()
    table = pq.read_table(side)
    frame = table.to_pandas()
    frame.loc[0, "sha1"], frame.loc[1, "sha1"] = frame.loc[1, "sha1"], frame.loc[0, "sha1"]
    import pyarrow as pa

    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(table.schema.metadata),
                   side)
    with pytest.raises(ValueError, match="t.lmdb: sidecar .* does not match"):
        check_lmdb(out)
    pq.write_table(pa.Table.from_pandas(frame.iloc[:-1], preserve_index=False)
                   .replace_schema_metadata(table.schema.metadata), side)
    with pytest.raises(ValueError, match="sidecar .* rows"):
        check_lmdb(out)
    side.unlink()
    with pytest.raises(ValueError, match="sidecar .* missing"):
        check_lmdb(out)
    side.write_bytes(good_side)

    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="t.lmdb: truncated"):
        check_lmdb(out)
    out.write_bytes(data[:100])
    with pytest.raises(ValueError, match="t.lmdb: truncated"):
        check_lmdb(out)
    out.write_bytes(data)
    check_lmdb(out)


def test_caption_references(toy, tmp_path):
    root, rows = toy
    ids = sorted(rows["image_id"])
    caps = pd.DataFrame([{"image_id": i, "caption_idx": j, "caption": f"{i} #{j}"}
                         for i in ids[1:] for j in range(1 + len(i) % 3)])
    out = tmp_path / "t.lmdb"
    pack_split(rows, root, out, captions=caps.sample(frac=1.0, random_state=1), relabel=True)
    side = LmdbReader(out).sidecar
    sorted_caps = caps.sort_values(["image_id", "caption_idx"]).reset_index(drop=True)
    assert side["caption_count"][0] == 0
    for _, r in side.iloc[1:].iterrows():
        got = sorted_caps.iloc[r["caption_start"]: r["caption_start"] + r["caption_count"]]
        assert (got["image_id"] == r["image_id"]).all() and len(got) == 1 + len(r["image_id"]) % 3
