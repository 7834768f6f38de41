"""Resumable download, retries, checksums and the lock file, against a local HTTP server."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from _http import FileServer

from dmf_core.data.fetch import (
    ChecksumError,
    DownloadError,
    cached_sha256,
    download,
    read_lock,
    update_lock,
    url_filename,
)

PAYLOAD = os.urandom(300_000) + b"end"
SHA = hashlib.sha256(PAYLOAD).hexdigest()
FAST = {"backoff": 0.01, "timeout": 5.0, "chunk_size": 16_384, "progress": False}


@pytest.fixture
def server():
    with FileServer() as srv:
        yield srv


def test_good_download(server, tmp_path):
    url = server.add("/data/Market-1501-v15.09.15.zip", PAYLOAD)
    dest = tmp_path / "Market-1501-v15.09.15.zip"
    assert download(url, dest, sha256=SHA.upper(), **FAST) == SHA
    assert dest.read_bytes() == PAYLOAD
    assert not dest.with_name(dest.name + ".part").exists()
    assert server.requests == [("/data/Market-1501-v15.09.15.zip", None)]
    assert cached_sha256(dest) == SHA  # stamp written by download


def test_resume_after_dropped_connection(server, tmp_path):
    url = server.add("/a.zip", PAYLOAD, mode="drop", times=2)
    sleeps = []
    digest = download(url, tmp_path / "a.zip", sha256=SHA, sleep=sleeps.append, **FAST)
    assert digest == SHA and (tmp_path / "a.zip").read_bytes() == PAYLOAD
    ranges = [r for _, r in server.requests]
    assert ranges[0] is None
    assert ranges[1] == f"bytes={len(PAYLOAD) // 2}-"  # resumed where the first transfer stopped
    assert ranges[2].startswith("bytes=") and int(ranges[2][6:-1]) > len(PAYLOAD) // 2
    assert sleeps == [0.01, 0.02]  # exponential backoff


def test_resume_from_existing_part_and_server_without_range(server, tmp_path):
    url = server.add("/b.zip", PAYLOAD, mode="no_range", times=99)
    part = tmp_path / "b.zip.part"
    part.write_bytes(PAYLOAD[:1000])
    assert download(url, tmp_path / "b.zip", sha256=SHA, **FAST) == SHA  # restarted from 0
    assert (tmp_path / "b.zip").read_bytes() == PAYLOAD


def test_complete_part_gets_416(server, tmp_path):
    url = server.add("/c.zip", PAYLOAD)
    (tmp_path / "c.zip.part").write_bytes(PAYLOAD)
    assert download(url, tmp_path / "c.zip", sha256=SHA, **FAST) == SHA


def test_wrong_checksum(server, tmp_path):
    url = server.add("/d.zip", PAYLOAD)
    with pytest.raises(ChecksumError, match="expected 0000"):
        download(url, tmp_path / "d.zip", sha256="0" * 64, **FAST)
    assert not (tmp_path / "d.zip").exists() and not (tmp_path / "d.zip.part").exists()


def test_sha256_prefix(server, tmp_path):
    url = server.add("/w.pth", PAYLOAD)
    assert download(url, tmp_path / "w.pth", sha256_prefix=SHA[:8], **FAST) == SHA
    with pytest.raises(ChecksumError, match="does not start with"):
        download(url, tmp_path / "w2.pth", sha256_prefix="ffffffff" if SHA[:8] != "ffffffff" else "0", **FAST)


def test_404_fails_without_retry(server, tmp_path):
    sleeps = []
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(server.url("/missing.zip"), tmp_path / "m.zip", sleep=sleeps.append, **FAST)
    assert sleeps == [] and len(server.requests) == 1


def test_timeout_is_retried(server, tmp_path):
    server.stall_seconds = 1.0
    url = server.add("/slow.zip", PAYLOAD, mode="stall", times=1)
    opts = {**FAST, "timeout": 0.3}
    assert download(url, tmp_path / "slow.zip", sha256=SHA, sleep=lambda s: None, **opts) == SHA
    assert len(server.requests) == 2


def test_gives_up_after_retries_and_keeps_part(server, tmp_path):
    url = server.add("/e.zip", PAYLOAD, mode="drop", times=99)
    with pytest.raises(DownloadError, match="giving up after 3 attempts.*re-run to resume"):
        download(url, tmp_path / "e.zip", retries=2, sleep=lambda s: None, **FAST)
    assert (tmp_path / "e.zip.part").stat().st_size > 0


def test_refuses_non_http(tmp_path):
    with pytest.raises(DownloadError, match="only http"):
        download("ftp://example.org/x.zip", tmp_path / "x.zip", **FAST)


def test_url_filename():
    assert url_filename("https://h/p/Market-1501-v15.09.15.zip?dl=1") == "Market-1501-v15.09.15.zip"
    assert url_filename("https://drive.google.com/file/d/abc/view") is None


def test_lock_file_sorted_and_atomic(tmp_path):
    lock = tmp_path / "data" / "checksums.json"
    update_lock(lock, "market1501", {"sha256": "b", "size": 2, "file": "m.zip"})
    update_lock(lock, "finegpr", {"sha256": "a", "size": 1, "file": "f.zip"})
    text = lock.read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert list(read_lock(lock)) == ["finegpr", "market1501"]
    assert [p.name for p in lock.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_cached_sha256_stamp_invalidated_on_change(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"one")
    assert cached_sha256(f) == hashlib.sha256(b"one").hexdigest()
    f.write_bytes(b"two!")
    assert cached_sha256(f) == hashlib.sha256(b"two!").hexdigest()


def test_html_page_is_not_saved_as_an_archive(server, tmp_path):
    url = server.add("/file/d/abc/view", b"<html>sign in</html>")
    with pytest.raises(DownloadError, match="HTML page"):
        download(url, tmp_path / "x.zip", sleep=lambda s: None, **FAST)
    assert len(server.requests) == 1 and not (tmp_path / "x.zip").exists()
