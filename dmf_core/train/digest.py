"""Content digests: of a file, of a folder's files, of the text encoder's files.

Apart from :mod:`dmf_core.train.fingerprint` so that the ``encode_captions`` stage can key its
caption states on the text encoder without importing what the resume fingerprint reads.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tree_sha256(root: str | Path, pattern: str = "*") -> str:
    """sha256 over (relative path, content sha256) of every file under ``root``, in sorted order."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob(pattern) if p.is_file()):
        h.update(f"{path.relative_to(root).as_posix()}\0{file_sha256(path)}\n".encode())
    return h.hexdigest()


def text_encoder_digest(name: str) -> str:
    """``model.text.name``'s encoder: a folder by what is in it, a hub id by its name."""
    from dmf_core.model.text import resolve_text_model

    location = resolve_text_model(name)
    return tree_sha256(location) if Path(location).is_dir() else location
