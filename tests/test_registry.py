"""Registry contents and acquire() end to end against a local HTTP server (no network)."""

from __future__ import annotations

import hashlib
import json

import pytest
from _archives import (
    build_cuhk03np,
    build_finegpr,
    build_market,
    build_msmt17,
    build_randperson,
    make_tar,
    make_zip,
)
from _http import FileServer

from dmf_core.config import DatasetSpec
from dmf_core.data import disk
from dmf_core.data.sources.acquire import acquire, acquire_file, extracted_record, record_verified
from dmf_core.data.sources.extract import InsufficientSpaceError
from dmf_core.data.sources.fetch import ChecksumError, DownloadError, FetchError, read_lock
from dmf_core.data.sources.layouts import LAYOUTS, parse_layout
from dmf_core.data.sources.manifest import check_statistics, read_manifest, verify_images, write_manifest
from dmf_core.data.sources.registry import REGISTRY

FAST = {"backoff": 0.01, "timeout": 5.0, "progress": False}
# The loopback server is plain http, which fetch.download refuses without a pinned sha256: the
# url tests below pin one (datasets.<name>.sha256 / acquire_file(sha256=...)).

# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

REQUIRED = ["finegpr", "finegpr_subset", "market1501", "dukemtmcreid", "msmt17_v1", "msmt17_v2",
            "msmt17_all", "cuhk03np_detected", "cuhk03np_labeled", "randperson_subset", "vit_base_jx"]


def test_registry_has_every_paper_dataset():
    assert set(REQUIRED) <= set(REGISTRY)
    for key, entry in REGISTRY.items():
        assert entry.key == key and entry.archive_names, key
        if entry.kind == "dataset":
            assert entry.layout in LAYOUTS, key
            assert entry.statistics and set(entry.statistics) <= {"train", "query", "gallery"}, key
            for split in entry.statistics.values():
                assert set(split) == {"ids", "images"}
            if entry.access != "public":
                assert entry.note and entry.licence, key
                assert "data/archives/" in entry.how_to_get()


def test_registry_official_numbers():
    s = REGISTRY["market1501"].statistics
    assert (s["train"]["images"], s["query"]["images"], s["gallery"]["images"]) == (12936, 3368, 15913)
    assert REGISTRY["msmt17_all"].statistics == {"train": {"ids": 4101, "images": 32621 + 11659 + 82161}}
    assert REGISTRY["randperson_subset"].statistics["train"] == {"ids": 8000, "images": 132145}
    assert REGISTRY["finegpr"].statistics["train"] == {"ids": 1150, "images": 2028600}
    assert REGISTRY["cuhk03np_labeled"].statistics["gallery"] == {"ids": 700, "images": 5328}
    assert REGISTRY["dukemtmcreid"].withdrawn and not REGISTRY["dukemtmcreid"].urls
    w = REGISTRY["vit_base_jx"]
    assert w.kind == "weights" and w.urls[0].endswith("jx_vit_base_p16_224-80ecf9dd.pth")
    assert w.sha256_prefix == "80ecf9dd"


# ---------------------------------------------------------------------------------------------
# acquire() end to end
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def server():
    with FileServer() as srv:
        yield srv


def _layout_case(kind: str, src):
    if kind == "market":
        return "market", "market1501", build_market(src), "zip"
    if kind == "msmt17_v2":
        return "msmt17", "msmt17_v2", build_msmt17(src, "V2")[0], "tar.gz"
    if kind == "msmt17_all":
        return "msmt17", "msmt17_all", build_msmt17(src, "V1")[1], "tar.gz"
    if kind == "cuhk03np":
        return "cuhk03np", "cuhk03np_labeled", build_cuhk03np(src)["labeled"], "zip"
    if kind == "randperson":
        return "randperson", "randperson_subset", build_randperson(src), "tar.gz"
    if kind == "finegpr":
        return "finegpr", "finegpr_subset", build_finegpr(src, subset=True), "zip"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["market", "msmt17_v2", "msmt17_all", "cuhk03np", "randperson", "finegpr"])
def test_acquire_url_parse_check_and_rerun(tmp_path, server, kind):
    src = tmp_path / "src"
    layout, name, expected, fmt = _layout_case(kind, src)
    archive = (make_zip if fmt == "zip" else make_tar)(src, tmp_path / f"built.{fmt}")
    url = server.add(f"/files/{name}.{fmt}", archive.read_bytes())
    spec = DatasetSpec(layout=layout, source="url", location=url,
                       sha256=hashlib.sha256(archive.read_bytes()).hexdigest())
    dirs = {"raw_dir": tmp_path / "data/raw" / name, "lock_file": tmp_path / "data/checksums.json",
            "cache_dir": tmp_path / "data/archives", "download_options": FAST}

    root = acquire(name, spec, **dirs)
    assert root == dirs["raw_dir"]
    df = parse_layout(layout, root, name)
    assert check_statistics(df, expected)["ok"].all()
    assert verify_images(df, root, tmp_path / "bad.txt") == []
    write_manifest(df, tmp_path / "data/manifests" / f"{name}.parquet")
    assert len(read_manifest(tmp_path / "data/manifests" / f"{name}.parquet")) == len(df)
    assert not read_lock(dirs["lock_file"])  # nothing recorded before the contents are checked
    record_verified(name, extracted_record(root), dirs["lock_file"], recorded_by="test")
    lock = read_lock(dirs["lock_file"])
    assert lock[name]["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert lock[name]["file"] == f"{name}.{fmt}" and lock[name]["url"] == url

    # re-run: the verified archive is reused (no request) and the extraction is kept
    (root / "sentinel").write_text("kept")
    n_requests = len(server.requests)
    assert acquire(name, spec, **dirs) == root
    assert len(server.requests) == n_requests
    assert (root / "sentinel").exists()


def test_acquire_resumes_dropped_download(tmp_path, server):
    src = tmp_path / "src"
    build_market(src, train_ids=30)
    data = make_zip(src, tmp_path / "m.zip").read_bytes()
    url = server.add("/Market-1501-v15.09.15.zip", data, mode="drop", times=1)
    spec = DatasetSpec(layout="market", source="url", location=url,
                       sha256=hashlib.sha256(data).hexdigest())
    root = acquire("market1501", spec, raw_dir=tmp_path / "raw", lock_file=tmp_path / "lock.json",
                   cache_dir=tmp_path / "archives", download_options=FAST)
    assert server.requests[1][1] == f"bytes={len(data) // 2}-"
    assert (tmp_path / "archives" / "Market-1501-v15.09.15.zip").read_bytes() == data
    assert len(parse_layout("market", root, "market1501")) > 0


def test_acquire_wrong_checksum_and_lock_mismatch(tmp_path, server):
    src = tmp_path / "src"
    build_randperson(src)
    data = make_zip(src, tmp_path / "r.zip").read_bytes()
    url = server.add("/randperson_subset.zip", data)
    dirs = {"raw_dir": tmp_path / "raw", "lock_file": tmp_path / "lock.json",
            "cache_dir": tmp_path / "archives", "download_options": FAST}
    bad = DatasetSpec(layout="randperson", source="url", location=url, sha256="ab" * 32)
    with pytest.raises(ChecksumError, match="params"):
        acquire("rp", bad, **dirs)
    assert not (tmp_path / "raw").exists() and not read_lock(dirs["lock_file"])

    pinned = DatasetSpec(layout="randperson", source="url", location=url,
                         sha256=hashlib.sha256(data).hexdigest())
    record_verified("rp", extracted_record(acquire("rp", pinned, **dirs)), dirs["lock_file"], "test run")
    good = DatasetSpec(layout="randperson", source="url", location=url)  # from now on, the lock file's hash
    # the server now serves other bytes and the cache is gone: the lock file catches it
    server.files["/randperson_subset.zip"] = data[:100] + bytes([data[100] ^ 1]) + data[101:]
    (tmp_path / "archives" / "randperson_subset.zip").unlink()
    with pytest.raises(ChecksumError, match=r"lock.json at 20\d\d-.* by test run.*dmf datasets --forget rp") as err:
        acquire("rp", good, **dirs)
    assert "corrupt" not in str(err.value)


def test_acquire_404_names_how_to_get(tmp_path, server):
    spec = DatasetSpec(layout="market", source="url", location=server.url("/gone/Market-1501-v15.09.15.zip"),
                       sha256="0" * 64)
    with pytest.raises(DownloadError, match="HTTP 404.*data/archives/Market-1501-v15.09.15.zip"):
        acquire("market1501", spec, raw_dir=tmp_path / "raw", lock_file=tmp_path / "l.json",
                cache_dir=tmp_path / "a", download_options=FAST)


def test_acquire_withdrawn_dataset_is_not_downloaded(tmp_path, server):
    spec = DatasetSpec(layout="market", source="url", location=server.url("/DukeMTMC-reID.zip"),
                       registry="dukemtmcreid")
    with pytest.raises(FetchError, match="withdrawn"):
        acquire("duke", spec, raw_dir=tmp_path / "raw", lock_file=tmp_path / "l.json", cache_dir=tmp_path / "a")
    assert server.requests == []


def test_acquire_local_archive(tmp_path):
    src = tmp_path / "src"
    expected, _ = build_msmt17(src, "V1")
    archive = make_tar(src, tmp_path / "data/archives/MSMT17_V1.tar.gz")
    spec = DatasetSpec(layout="msmt17", source="archive", location=str(archive), registry="msmt17_v1")
    root = acquire("msmt17", spec, raw_dir=tmp_path / "data/raw/msmt17", lock_file=tmp_path / "lock.json",
                   cache_dir=tmp_path / "data/archives")
    check_statistics(parse_layout("msmt17", root, "msmt17"), expected)
    record_verified("msmt17", extracted_record(root), tmp_path / "lock.json", "test")
    rec = json.loads((tmp_path / "lock.json").read_text())["msmt17"]
    assert rec["source"] == "archive" and rec["file"] == "MSMT17_V1.tar.gz"

    missing = DatasetSpec(layout="msmt17", source="archive", location=str(tmp_path / "nope.tar.gz"),
                          registry="msmt17_v1")
    with pytest.raises(FileNotFoundError, match=r"e-mail the authors.*data/archives/MSMT17_V1.tar.gz"):
        acquire("msmt17", missing, raw_dir=tmp_path / "r2", lock_file=tmp_path / "lock.json",
                cache_dir=tmp_path / "a")


def test_acquire_dir_source(tmp_path):
    src = tmp_path / "extracted"
    expected = build_market(src)
    spec = DatasetSpec(layout="market", source="dir", location=str(src))
    root = acquire("m", spec, raw_dir=tmp_path / "data/raw/m", lock_file=tmp_path / "l.json",
                   cache_dir=tmp_path / "a")
    check_statistics(parse_layout("market", root, "m"), expected)
    # already in place: used as is
    spec2 = DatasetSpec(layout="market", source="dir", location=str(root))
    assert acquire("m", spec2, raw_dir=root, lock_file=tmp_path / "l.json", cache_dir=tmp_path / "a") == root
    with pytest.raises(FileNotFoundError, match="source: dir"):
        acquire("m", DatasetSpec(layout="market", source="dir", location=str(tmp_path / "x")),
                raw_dir=tmp_path / "r", lock_file=tmp_path / "l.json", cache_dir=tmp_path / "a")


def test_acquire_corrupt_jpeg_inside_is_reported_not_fatal(tmp_path):
    src = tmp_path / "src"
    build_market(src, top="Market-1501-v15.09.15")
    victim = sorted((src / "Market-1501-v15.09.15" / "query").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated JPEG
    archive = make_zip(src, tmp_path / "Market-1501-v15.09.15.zip")
    spec = DatasetSpec(layout="market", source="archive", location=str(archive))
    root = acquire("market1501", spec, raw_dir=tmp_path / "raw", lock_file=tmp_path / "l.json",
                   cache_dir=tmp_path / "a")
    df = parse_layout("market", root, "market1501")
    report = tmp_path / "market1501.bad_images.txt"
    bad = verify_images(df, root, report)
    assert bad == [f"Market-1501-v15.09.15/query/{victim.name}"]
    assert report.read_text().startswith(bad[0] + "\t")
    assert victim.name in df["image_id"].str.rsplit("/", n=1).str[-1].tolist()  # not silently dropped


def test_acquire_too_little_disk_space(tmp_path, monkeypatch):
    src = tmp_path / "src"
    build_finegpr(src)
    archive = make_zip(src, tmp_path / "FineGPR.zip")
    spec = DatasetSpec(layout="finegpr", source="archive", location=str(archive))
    monkeypatch.setattr(disk, "free_bytes", lambda path: 10)
    with pytest.raises(InsufficientSpaceError, match="free"):
        acquire("finegpr", spec, raw_dir=tmp_path / "raw/finegpr", lock_file=tmp_path / "l.json",
                cache_dir=tmp_path / "a")
    assert not (tmp_path / "raw/finegpr").exists()


def test_acquire_file_weights(tmp_path, server):
    payload = b"not really a checkpoint"
    sha = hashlib.sha256(payload).hexdigest()
    url = server.add("/jx_vit_base_p16_224-80ecf9dd.pth", payload)
    with pytest.raises(ChecksumError, match="80ecf9dd"):  # the registry's hash prefix is enforced
        acquire_file("vit_base_jx", location=url, lock_file=tmp_path / "l.json", cache_dir=tmp_path / "m",
                     sha256=sha, download_options=FAST)
    url2 = server.add("/other.pth", payload)
    path = acquire_file("other_weights", location=url2, lock_file=tmp_path / "l.json",
                        cache_dir=tmp_path / "m", sha256=sha, download_options=FAST)
    assert path.read_bytes() == payload
    assert read_lock(tmp_path / "l.json")["other_weights"]["sha256"] == hashlib.sha256(payload).hexdigest()


def test_layout_options_and_statistics_follow_the_registry_key():
    from dmf_core.data.sources.acquire import expected_statistics, layout_options

    spec = DatasetSpec(layout="msmt17", source="archive", location="x", registry="msmt17_all")
    assert layout_options("whatever", spec) == {"combine_all": True}
    assert expected_statistics("whatever", spec)["train"]["ids"] == 4101
    plain = DatasetSpec(layout="market", source="dir", location="x")
    assert layout_options("my_set", plain) == {} and expected_statistics("my_set", plain) == {}
    with pytest.raises(ValueError, match="registry: 'nope' unknown"):
        layout_options("x", DatasetSpec(layout="market", source="dir", location="x", registry="nope"))


# ---------------------------------------------------------------------------------------------
# Leakage: a source that trains on a target's query/gallery
# ---------------------------------------------------------------------------------------------


def test_leakage_reason_paper_profile():
    from pathlib import Path

    import yaml

    from dmf_core.config import config_from_dict
    from dmf_core.data.sources.registry import leakage_reason

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "paper.yaml").read_text())
    datasets = config_from_dict(params).datasets
    reason = leakage_reason("msmt17_all", "msmt17", datasets)
    assert reason and "msmt17_all" in reason and "query and gallery" in reason and "not a transfer" in reason
    for source in ("market1501", "msmt17", "randperson", "pretrain"):
        for target in ("market1501", "cuhk03np", "msmt17"):
            assert leakage_reason(source, target, datasets) is None, (source, target)
    assert leakage_reason("msmt17_all", "market1501", datasets) is None
    assert leakage_reason("msmt17_all", "cuhk03np", datasets) is None


def test_leakage_reason_without_registry_keys():
    from dmf_core.data.sources.registry import leakage_reason

    datasets = {  # no registry: the same archive read with and without combine_all
        "my_msmt_all": DatasetSpec(layout="msmt17", source="archive", location="data/archives/M.tar.gz"),
        "my_msmt": DatasetSpec(layout="msmt17", source="archive", location="data/archives/M.tar.gz"),
        "other": DatasetSpec(layout="msmt17", source="archive", location="data/archives/O.tar.gz"),
        "v2": DatasetSpec(layout="msmt17", source="archive", location="data/archives/V2.tar.gz",
                          registry="msmt17_v2"),
        "all_v1": DatasetSpec(layout="msmt17", source="archive", location="data/archives/V1.tar.gz",
                              registry="msmt17_all"),
    }
    assert "the same files" in leakage_reason("my_msmt_all", "my_msmt", datasets)
    assert leakage_reason("my_msmt_all", "other", datasets) is None
    # train split only, but the target's photos: the target's own domain, so no transfer either
    assert "in-domain, not a transfer result" in leakage_reason("my_msmt", "my_msmt_all", datasets)
    assert "photo collection (msmt17)" in leakage_reason("v2", "all_v1", datasets)
    assert "photo collection (msmt17)" in leakage_reason("all_v1", "v2", datasets)  # V2 = V1 faces blurred
