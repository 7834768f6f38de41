"""Builders for scaled-down copies of the real dataset layouts, and archives of them (tests only).

Every builder writes real file-name patterns into ``dest`` and returns the statistics the
layout parser must find ({split: {"ids", "images"}}), counting like the registry does (pid 0
distractors count as an id, junk -1 is not counted).
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

from PIL import Image

_JPEG: bytes | None = None
_PNG: bytes | None = None


def jpeg_bytes() -> bytes:
    global _JPEG
    if _JPEG is None:
        buf = io.BytesIO()
        Image.new("RGB", (8, 16), (120, 30, 200)).save(buf, format="JPEG", quality=80)
        _JPEG = buf.getvalue()
    return _JPEG


def png_bytes() -> bytes:
    global _PNG
    if _PNG is None:
        buf = io.BytesIO()
        Image.new("RGB", (8, 16), (20, 130, 40)).save(buf, format="PNG")
        _PNG = buf.getvalue()
    return _PNG


def _put(path: Path, data: bytes | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes() if data is None else data)


def _stats(**splits: tuple[int, int]) -> dict:
    return {s: {"ids": i, "images": n} for s, (i, n) in splits.items()}


def build_market(dest: Path, top: str = "Market-1501-v15.09.15", train_ids: int = 4, test_ids: int = 3,
                 cams: int = 6, ext: str = ".jpg", duke: bool = False) -> dict:
    """Market-1501 (or Duke with ``duke=True``) layout; gallery has junk (-1) and distractors (0)."""
    base = dest / top if top else dest
    data = png_bytes() if ext == ".png" else jpeg_bytes()

    def name(pid: int, cam: int, k: int) -> str:
        p = f"{pid:04d}" if pid >= 0 else "-1"
        return f"{p}_c{cam}_f{k:07d}{ext}" if duke else f"{p}_c{cam}s1_{k:06d}_0{k % 3 + 1}{ext}"

    n_train = 0
    for pid in range(2, 2 + 2 * train_ids, 2):  # ids not contiguous, like Market
        for cam in (1, cams):
            _put(base / "bounding_box_train" / name(pid, cam, pid * 10 + cam), data)
            n_train += 1
    n_query = n_gallery = 0
    for pid in range(1001, 1001 + test_ids):
        _put(base / "query" / name(pid, 1, pid), data)
        n_query += 1
        for cam in range(2, min(cams, 3) + 1):
            _put(base / "bounding_box_test" / name(pid, cam, pid + cam), data)
            n_gallery += 1
    for k in range(2):  # distractors (kept) and junk (dropped)
        _put(base / "bounding_box_test" / name(0, 1 + k, 50 + k), data)
        _put(base / "bounding_box_test" / name(-1, 1 + k, 60 + k), data)
    n_gallery += 2
    (base / "bounding_box_test" / "Thumbs.db").write_bytes(b"not an image")
    return _stats(train=(train_ids, n_train), query=(test_ids, n_query), gallery=(test_ids + 1, n_gallery))


def build_cuhk03np(dest: Path, train_ids: int = 3, test_ids: int = 2) -> dict[str, dict]:
    """cuhk03-np/{detected,labeled}/...; returns {"detected": stats, "labeled": stats}."""
    out = {}
    for variant, extra in (("detected", 0), ("labeled", 1)):
        base = dest / "cuhk03-np" / variant
        n = {"train": 0, "query": 0, "gallery": 0}
        for pid in range(1, 1 + train_ids + extra):
            for cam in (1, 2):
                _put(base / "bounding_box_train" / f"{pid:04d}_c{cam}_{cam}.png", png_bytes())
                n["train"] += 1
        for pid in range(100, 100 + test_ids):
            _put(base / "query" / f"{pid:04d}_c1_1.png", png_bytes())
            _put(base / "bounding_box_test" / f"{pid:04d}_c2_1.png", png_bytes())
            _put(base / "bounding_box_test" / f"{pid:04d}_c2_2.png", png_bytes())
            n["query"] += 1
            n["gallery"] += 2
        out[variant] = _stats(train=(train_ids + extra, n["train"]), query=(test_ids, n["query"]),
                              gallery=(test_ids, n["gallery"]))
    return out


def build_msmt17(dest: Path, version: str = "V1", train_ids: int = 3, test_ids: int = 2) -> tuple[dict, dict]:
    """MSMT17_V1 (train/, test/) or MSMT17_V2 (mask_train_v2/, mask_test_v2/) with list files.

    Returns (stats, stats_all) for the normal and the combine-all reading.
    """
    base = dest / f"MSMT17_{version}"
    train_dir, test_dir = ("train", "test") if version == "V1" else ("mask_train_v2", "mask_test_v2")
    lists: dict[str, list[str]] = {"train": [], "val": [], "query": [], "gallery": []}
    for pid in range(train_ids):
        for k, cam in enumerate((1, 15)):
            rel = f"{pid:04d}/{pid:04d}_{k:03d}_{cam:02d}_0303morning_{k:04d}_0.jpg"
            _put(base / train_dir / rel)
            lists["val" if (pid == 0 and k == 1) else "train"].append(f"{rel} {pid}")
    for pid in range(test_ids):
        for k, cam in enumerate((2, 3, 4)):
            rel = f"{pid:04d}/{pid:04d}_{k:03d}_{cam:02d}_0113noon_{k:04d}_1.jpg"
            _put(base / test_dir / rel)
            lists["query" if k == 0 else "gallery"].append(f"{rel} {pid}")
    for key, lines in lists.items():
        (base / f"list_{key}.txt").write_text("\n".join(lines) + "\n")
    n_train = 2 * train_ids
    stats = _stats(train=(train_ids, n_train), query=(test_ids, test_ids), gallery=(test_ids, 2 * test_ids))
    stats_all = _stats(train=(train_ids + test_ids, n_train + 3 * test_ids))
    return stats, stats_all


def build_cuhksysu(dest: Path, ids: int = 3) -> dict:
    """CUHK-SYSU crops as torchreid and fast-reid read them: ``cuhksysu/cropped_images/p<pid>_s<scene>_<n>.jpg``."""
    for pid in range(1, ids + 1):
        for n in (1, 2):
            _put(dest / "cuhksysu" / "cropped_images" / f"p{pid}_s{3 * pid + n}_{n}.jpg")
    return _stats(train=(ids, 2 * ids))


def build_randperson(dest: Path, ids: int = 3) -> dict:
    base = dest / "randperson_subset"
    n = 0
    for pid in range(ids):
        for scene, cam in ((0, 0), (10, 3), (pid % 11, 1)):
            _put(base / f"{pid:06d}_s{scene:02d}_c{cam:02d}_f{pid * 7 + cam:06d}.jpg")
            n += 1
    return _stats(train=(ids, n))


def build_finegpr(dest: Path, ids: int = 3, per_id: int = 4, subset: bool = False) -> dict:
    base = dest / "FineGPR_Dataset"
    n = 0
    for i in range(ids):
        pid = 1 + 2 * i  # 0001, 0003, ... not contiguous
        for k in range(per_id):
            name = f"{pid:04d}_c{1 + 9 * k % 36:02d}_w{1 + k % 7:02d}_l{1 + (k + i) % 7:02d}_p{1 + k % 9:02d}.jpg"
            _put((base / "FineGPR_subset" / name) if subset else (base / "FineGPR" / f"{pid:04d}" / name))
            n += 1
    return _stats(train=(ids, n))


# ---------------------------------------------------------------------------------------------
# Archives
# ---------------------------------------------------------------------------------------------


def make_zip(src: Path, archive: Path) -> Path:
    """Zip every file below ``src`` with paths relative to ``src`` (sorted, deterministic)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(src).as_posix())
    return archive


def make_tar(src: Path, archive: Path) -> Path:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tf:
        for path in sorted(src.rglob("*")):
            tf.add(path, path.relative_to(src).as_posix(), recursive=False)
    return archive


def tar_with_members(archive: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """A tar.gz with hand-made members (for zip-slip / link attacks)."""
    with tarfile.open(archive, "w:gz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return archive
