"""Fault injection, resources: memory estimates refuse up front; a full disk leaves no half output.

The re-ranking refusals themselves are in test_rerank.py (test_refusals_and_bad_input); extraction
space checks in test_extract.py. Here: the evaluate stage path, and ENOSPC injected mid-write into
pack_split, write_manifest and write_captions.
"""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _faults import good_jpeg

from dmf_core.data import disk
from dmf_core.data.captions import generate as cap
from dmf_core.data.sources import manifest
from dmf_core.data.store import lmdb_store
from dmf_core.data.store.lmdb_store import LmdbReader, pack_split


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture()
def images(tmp_path):
    root = tmp_path / "raw"
    rows = []
    for i in range(6):
        rel = f"img/{i:04d}_c1s1_000001_01.jpg"
        (root / "img").mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(good_jpeg(color=(30 * i, 60, 90)))
        rows.append({"image_id": rel, "split": "train", "pid": i // 2, "camid": i % 2, "dataset": "d"})
    return root, pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------- memory


def test_rerank_refuses_before_computing_when_evaluating(monkeypatch):
    """evaluate.rerank goes through rerank_from_features, which states the GiB and refuses."""
    from dmf_core.eval import rerank

    monkeypatch.setattr(rerank, "available_memory_bytes", lambda: 64 << 20)  # a 64 MiB machine
    q, g = np.zeros((3000, 8), np.float32), np.zeros((30000, 8), np.float32)
    with pytest.raises(MemoryError, match=r"needs about [\d.]+ GiB but only 0\.1 GiB"):
        rerank.rerank_from_features(q, g)
    # the figure comes from the estimate alone (the check runs before the k-NN search)
    assert rerank.estimate_sparse_bytes(3000, 30000) > 64 << 20


# --------------------------------------------------------------------------------------------- disk


def test_pack_refuses_up_front_when_the_disk_is_too_small(images, tmp_path, monkeypatch):
    root, df = images
    monkeypatch.setattr(disk, "free_bytes", lambda path: 1 << 20)
    out = tmp_path / "lmdb" / "d-train.lmdb"
    with pytest.raises(disk.InsufficientSpaceError, match=r"d-train\.lmdb: packing needs about .* MiB"):
        pack_split(df, root, out)
    assert _files(tmp_path / "lmdb") == []


@pytest.mark.parametrize("where", ["put", "sidecar", "report"])
def test_pack_disk_full_mid_write_leaves_nothing(images, tmp_path, monkeypatch, where):
    root, df = images
    out = tmp_path / "lmdb" / "d-train.lmdb"
    pack_split(df, root, out)  # a previous good pack: replaced or removed, never half-overwritten
    if where == "put":
        class FullTxn:
            def __init__(self, txn):
                self.txn, self.n = txn, 0

            def put(self, *a, **k):
                self.n += 1
                if self.n == 3:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return self.txn.put(*a, **k)

            def __getattr__(self, name):
                return getattr(self.txn, name)

        real_open = lmdb_store.lmdb.open

        def open_(*a, **k):
            env = real_open(*a, **k)

            class Env:
                def begin(self, *a, **k):
                    return FullTxn(env.begin(*a, **k))

                def __getattr__(self, name):
                    return getattr(env, name)
            return Env()
        monkeypatch.setattr(lmdb_store.lmdb, "open", open_)
    elif where == "sidecar":
        monkeypatch.setattr(lmdb_store, "_write_sidecar", _enospc)
    else:
        (root / df.image_id[1]).write_bytes(b"not an image")  # skip -> a corrupt report gets written
        real = Path.write_text
        monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: _enospc() if self.name.endswith(
            ".corrupt.json") else real(self, *a, **k))
    with pytest.raises(OSError) as err:
        pack_split(df, root, out, on_corrupt="skip")
    assert err.value.errno == errno.ENOSPC
    assert _files(tmp_path / "lmdb") == []  # no LMDB, no sidecar, no .partial left behind
    monkeypatch.undo()
    (root / df.image_id[1]).write_bytes(good_jpeg(color=(30, 60, 90)))
    pack_split(df, root, out)  # and the next run just works
    assert len(LmdbReader(out)) == len(df)


def test_write_manifest_disk_full_keeps_the_old_manifest(images, tmp_path, monkeypatch):
    _, df = images
    path = tmp_path / "manifests" / "d.parquet"
    manifest.write_manifest(df, path)
    before = path.read_bytes()
    real = manifest.pq.write_table

    def half_then_full(table, where, **kw):
        Path(where).write_bytes(b"PAR1 half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(manifest.pq, "write_table", half_then_full)
    with pytest.raises(OSError):
        manifest.write_manifest(df.iloc[:3], path)
    assert path.read_bytes() == before
    assert _files(path.parent) == ["d.parquet"]
    monkeypatch.setattr(manifest.pq, "write_table", real)
    assert len(manifest.read_manifest(path)) == len(df)


@pytest.mark.parametrize("where", ["parquet", "json"])
def test_write_captions_disk_full_leaves_no_half_pair(tmp_path, monkeypatch, where):
    table = pd.DataFrame({"image_id": ["a.jpg", "a.jpg", "b.jpg"], "caption_idx": [0, 1, 0],
                          "caption": ["A man.", "A man walking.", "A woman."]})
    out_dir = tmp_path / "captions"
    pq_path, js_path = out_dir / "finegpr.parquet", out_dir / "finegpr_coco.json"
    cap.write_captions(table, pq_path, js_path)
    before = (pq_path.read_bytes(), js_path.read_bytes())
    if where == "parquet":
        monkeypatch.setattr(cap.pq, "write_table", lambda *a, **k: _enospc())
    else:
        monkeypatch.setattr(cap, "_write_joined", lambda fh, *a, **k: (fh.write(b"{\"half"), _enospc()))
    with pytest.raises(OSError):
        cap.write_captions(table.iloc[:1], pq_path, js_path)
    assert (pq_path.read_bytes(), js_path.read_bytes()) == before  # the old, consistent pair
    assert _files(out_dir) == ["finegpr.parquet", "finegpr_coco.json"]
