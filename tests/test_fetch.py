"""Resumable download, retries, checksums and the lock file, against a local HTTP server.

The loopback server is plain http, and plain http is refused without a pinned sha256, so every
download here that is not about that refusal passes ``sha256=``. The https cases (first use
without a pin, a redirect down to http) run against the same server with TLS, trusted through
``SSL_CERT_FILE``; they are skipped where there is no ``openssl`` to make its certificate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import urllib.request

import pytest
from _http import FileServer, tls_contexts

from dmf_core.data.sources import fetch
from dmf_core.data.sources.acquire import acquire_file
from dmf_core.data.sources.fetch import (
    CheckedRedirectHandler,
    ChecksumError,
    DownloadError,
    InsecureURLError,
    cached_sha256,
    check_sha256,
    download,
    forget_lock,
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
    url = server.add("/b.zip", PAYLOAD, mode="drop")
    with pytest.raises(DownloadError, match="re-run to resume"):  # leaves a half part + its record
        download(url, tmp_path / "b.zip", sha256=SHA, retries=0, **FAST)
    server.modes["/b.zip"] = ("no_range", 99)
    assert download(url, tmp_path / "b.zip", sha256=SHA, **FAST) == SHA  # restarted from 0
    assert server.requests[1][1] == f"bytes={len(PAYLOAD) // 2}-"  # asked to resume, got a 200
    assert (tmp_path / "b.zip").read_bytes() == PAYLOAD


def test_complete_part_gets_416(server, tmp_path, monkeypatch):
    url = server.add("/c.zip", PAYLOAD)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the run dies while hashing: the part is complete, not yet renamed

    monkeypatch.setattr(fetch, "sha256_file", killed)
    with pytest.raises(KeyboardInterrupt):
        download(url, tmp_path / "c.zip", sha256=SHA, **FAST)
    monkeypatch.undo()
    assert (tmp_path / "c.zip.part").stat().st_size == len(PAYLOAD)
    assert download(url, tmp_path / "c.zip", sha256=SHA, **FAST) == SHA
    assert server.requests[-1][1] == f"bytes={len(PAYLOAD)}-"  # answered 416: nothing downloaded again
    assert (tmp_path / "c.zip").read_bytes() == PAYLOAD


def test_wrong_checksum(server, tmp_path):
    url = server.add("/d.zip", PAYLOAD)
    with pytest.raises(ChecksumError, match="expected 0000"):
        download(url, tmp_path / "d.zip", sha256="0" * 64, **FAST)
    assert not (tmp_path / "d.zip").exists() and not (tmp_path / "d.zip.part").exists()


def test_sha256_prefix(server, tmp_path):
    url = server.add("/w.pth", PAYLOAD)
    # (plain http needs the full hash pinned as well; the prefix is checked on top of it)
    assert download(url, tmp_path / "w.pth", sha256=SHA, sha256_prefix=SHA[:8], **FAST) == SHA
    with pytest.raises(ChecksumError, match="does not start with"):
        download(url, tmp_path / "w2.pth", sha256=SHA,
                 sha256_prefix="ffffffff" if SHA[:8] != "ffffffff" else "0", **FAST)


def test_404_fails_without_retry(server, tmp_path):
    sleeps = []
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(server.url("/missing.zip"), tmp_path / "m.zip", sha256=SHA, sleep=sleeps.append, **FAST)
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
        download(url, tmp_path / "e.zip", sha256=SHA, retries=2, sleep=lambda s: None, **FAST)
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
        download(url, tmp_path / "x.zip", sha256=SHA, sleep=lambda s: None, **FAST)
    assert len(server.requests) == 1 and not (tmp_path / "x.zip").exists()


# ---------------------------------------------------------------------------------------------
# No splicing: a resume is tied to the version of the file it started with
# ---------------------------------------------------------------------------------------------

NEW = os.urandom(len(PAYLOAD))  # same length as PAYLOAD: the size alone cannot tell them apart
NEW_SHA = hashlib.sha256(NEW).hexdigest()


def _changes_to(server, path: str, data: bytes):
    """A ``sleep`` for download(): between two attempts the server's file is replaced."""
    return lambda seconds: server.files.__setitem__(path, data)


@pytest.mark.parametrize("validator", ["ETag", "Last-Modified"])
@pytest.mark.parametrize("honour_if_range", [True, False],
                         ids=["server_honours_if_range", "server_ignores_it"])
def test_file_changed_between_attempts_is_not_spliced(server, tmp_path, validator, honour_if_range):
    server.honour_if_range = honour_if_range
    kind = {"ETag": "etag", "Last-Modified": "last_modified"}[validator]
    url = server.add("/f.zip", PAYLOAD, mode="drop", times=1, validators=(kind,))
    dest = tmp_path / "f.zip"
    assert download(url, dest, sha256=NEW_SHA, sleep=_changes_to(server, "/f.zip", NEW), **FAST) == NEW_SHA
    assert dest.read_bytes() == NEW
    first_validator = server.responses[0][1][validator]
    assert server.headers[1]["Range"] == f"bytes={len(PAYLOAD) // 2}-"
    assert server.headers[1]["If-Range"] == first_validator
    if honour_if_range:  # If-Range failed: the server sent all of the new file
        assert [status for status, _ in server.responses] == [200, 200]
    else:  # a 206 of the new version, with another validator: dropped, fetched again from byte 0
        assert [status for status, _ in server.responses] == [200, 206, 200]
        assert server.responses[1][1][validator] != first_validator
        assert server.requests[2][1] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".f.zip.sha256.json", "f.zip"]


@pytest.mark.parametrize("validators", [(), ("weak_etag",)], ids=["none", "weak_etag_only"])
def test_no_validator_means_no_blind_resume(server, tmp_path, caplog, validators):
    url = server.add("/n.zip", PAYLOAD, mode="drop", times=1, validators=validators)
    with caplog.at_level(logging.WARNING, logger="dmf_core.data.sources.fetch"):
        assert download(url, tmp_path / "n.zip", sha256=SHA, sleep=lambda s: None, **FAST) == SHA
    assert [r for _, r in server.requests] == [None, None]  # started over instead of sending a Range
    assert "If-Range" not in server.headers[1]
    assert "sent no ETag or Last-Modified" in caplog.text and "starting over" in caplog.text


def test_no_validator_give_up_message_says_a_rerun_starts_over(server, tmp_path):
    url = server.add("/g.zip", PAYLOAD, mode="drop", times=9, validators=())
    with pytest.raises(DownloadError, match="re-run starts over"):
        download(url, tmp_path / "g.zip", sha256=SHA, retries=0, **FAST)


def test_part_without_a_record_is_not_resumed(server, tmp_path):
    url = server.add("/l.zip", PAYLOAD)
    (tmp_path / "l.zip.part").write_bytes(PAYLOAD[:1000])  # as left by an older version
    assert download(url, tmp_path / "l.zip", sha256=SHA, **FAST) == SHA
    assert server.requests == [("/l.zip", None)]


def test_part_from_another_url_is_not_resumed(server, tmp_path):
    other = os.urandom(len(PAYLOAD))
    url_a = server.add("/mirror-a/x.zip", other, mode="drop", times=1)
    with pytest.raises(DownloadError, match="re-run to resume"):
        download(url_a, tmp_path / "x.zip", sha256=hashlib.sha256(other).hexdigest(), retries=0, **FAST)
    assert json.loads((tmp_path / ".x.zip.part.json").read_text())["url"] == url_a
    url_b = server.add("/mirror-b/x.zip", PAYLOAD)
    assert download(url_b, tmp_path / "x.zip", sha256=SHA, **FAST) == SHA
    assert server.requests[-1] == ("/mirror-b/x.zip", None)
    assert (tmp_path / "x.zip").read_bytes() == PAYLOAD


def test_part_record_and_part_symlinks_are_not_followed(server, tmp_path):
    url = server.add("/s.zip", PAYLOAD, mode="drop", times=1)
    victim = tmp_path / "victim.json"
    victim.write_text("keep")
    meta = tmp_path / ".s.zip.part.json"
    meta.symlink_to(victim)
    with pytest.raises(DownloadError):
        download(url, tmp_path / "s.zip", sha256=SHA, retries=0, **FAST)
    assert victim.read_text() == "keep" and not meta.is_symlink()  # replaced, not written through

    # a record that is a symlink (even to a valid record) is not read: the part starts over
    good = tmp_path / "good.json"
    good.write_text(meta.read_text())
    meta.unlink()
    meta.symlink_to(good)
    assert download(url, tmp_path / "s.zip", sha256=SHA, **FAST) == SHA
    assert server.requests[-1] == ("/s.zip", None)

    # a part that is a symlink is removed, not appended to
    (tmp_path / "s.zip").unlink()
    (tmp_path / "s.zip.part").symlink_to(victim)
    assert download(url, tmp_path / "s.zip", sha256=SHA, **FAST) == SHA
    assert victim.read_text() == "keep" and (tmp_path / "s.zip").read_bytes() == PAYLOAD


# ---------------------------------------------------------------------------------------------
# Plain http needs a pinned sha256, on every redirect hop
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pin", [{}, {"sha256_prefix": SHA[:8]}, {"sha256": SHA[:32]}],
                         ids=["nothing", "prefix_only", "short_hash"])
def test_plain_http_without_pinned_sha256_is_refused(server, tmp_path, pin):
    url = server.add("/p.zip", PAYLOAD)
    with pytest.raises(InsecureURLError, match=re.escape(url) + r".*use an https:// URL, or pin"):
        download(url, tmp_path / "p.zip", **pin, **FAST)
    assert server.requests == [] and not list(tmp_path.iterdir())


def test_acquire_refuses_unpinned_http_and_records_nothing(server, tmp_path):
    url = server.add("/weights.pth", PAYLOAD)
    with pytest.raises(InsecureURLError, match="datasets.<name>.sha256"):
        acquire_file("some_weights", location=url, lock_file=tmp_path / "l.json", cache_dir=tmp_path / "m",
                     download_options=FAST)
    assert server.requests == [] and not (tmp_path / "l.json").exists()


def test_redirect_handler_checks_every_hop():
    req = urllib.request.Request("https://example.org/a.zip")
    with pytest.raises(InsecureURLError, match="https://example.org/a.zip redirects to http://example.org/b"):
        CheckedRedirectHandler(pinned=False).redirect_request(req, None, 302, "Found", {},
                                                               "http://example.org/b.zip")
    new = CheckedRedirectHandler(pinned=True).redirect_request(req, None, 302, "Found", {},
                                                                "http://example.org/b.zip")
    assert new.full_url == "http://example.org/b.zip"  # a pinned hash makes the downgrade harmless
    new = CheckedRedirectHandler(pinned=False).redirect_request(req, None, 301, "Moved", {},
                                                                 "https://cdn.example.org/a.zip")
    assert new.full_url == "https://cdn.example.org/a.zip"
    with pytest.raises(DownloadError, match="only http"):
        CheckedRedirectHandler(pinned=True).redirect_request(req, None, 302, "Found", {},
                                                              "ftp://example.org/a.zip")


def test_download_uses_the_checked_redirects(server, tmp_path):
    real = server.add("/real.zip", PAYLOAD)
    url = server.redirect("/r.zip", real)
    assert download(url, tmp_path / "r.zip", sha256=SHA, **FAST) == SHA  # pinned: http hops are fine
    assert [p for p, _ in server.requests] == ["/r.zip", "/real.zip"]
    # a hop to a scheme urllib would follow on its own (ftp) is stopped by download's handler
    server.redirect("/to-ftp.zip", "ftp://127.0.0.1:9/a.zip")
    sleeps = []
    with pytest.raises(DownloadError, match="redirects to ftp://.*only http"):
        download(server.url("/to-ftp.zip"), tmp_path / "f.zip", sha256=SHA, sleep=sleeps.append, **FAST)
    assert sleeps == []  # refused at once, not retried


@pytest.fixture
def tls_server(tmp_path_factory, monkeypatch):
    """The loopback server over https, with its self-signed certificate trusted (SSL_CERT_FILE)."""
    tls = tls_contexts(tmp_path_factory.mktemp("tls"))
    if tls is None:
        pytest.skip("no openssl command to make a test certificate")
    ctx, cert = tls
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    with FileServer(tls=ctx) as srv:
        yield srv


def test_https_first_use_without_pin_gets_the_new_file_whole(tls_server, tmp_path):
    """The issue's case: unpinned (trust on first use), the file changes after a dropped connection."""
    url = tls_server.add("/t.zip", PAYLOAD, mode="drop", times=1)
    assert url.startswith("https://")
    assert download(url, tmp_path / "t.zip", sleep=_changes_to(tls_server, "/t.zip", NEW), **FAST) == NEW_SHA
    assert (tmp_path / "t.zip").read_bytes() == NEW
    assert tls_server.headers[1]["If-Range"] == tls_server.responses[0][1]["ETag"]


def test_https_redirect_to_http_is_refused_unless_pinned(tls_server, server, tmp_path):
    target = server.add("/a.zip", PAYLOAD)
    url = tls_server.redirect("/a.zip", target)
    with pytest.raises(InsecureURLError, match=re.escape(f"{url} redirects to {target}") + ".*pin"):
        download(url, tmp_path / "a.zip", sleep=lambda s: None, **FAST)
    assert server.requests == [] and not (tmp_path / "a.zip").exists()
    assert download(url, tmp_path / "a.zip", sha256=SHA, **FAST) == SHA
    assert server.requests == [("/a.zip", None)]


def test_forget_lock(tmp_path):
    lock = tmp_path / "checksums.json"
    assert forget_lock(lock, "a") is None  # no file yet
    update_lock(lock, "a", {"sha256": "1"})
    update_lock(lock, "b", {"sha256": "2"})
    assert forget_lock(lock, "a") == {"sha256": "1"}
    assert read_lock(lock) == {"b": {"sha256": "2"}}
    assert forget_lock(lock, "a") is None


def test_checksum_mismatch_never_says_corrupt(tmp_path):
    path = tmp_path / "x.zip"
    with pytest.raises(ChecksumError) as err:
        check_sha256(path, "ab" * 32, "cd" * 32, "recorded by an earlier run")
    assert "corrupt" not in str(err.value) and "recorded by an earlier run" in str(err.value)
