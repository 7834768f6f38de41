"""Free disk space, checked before the long writes (archive extraction, packing).

:func:`free_bytes` is looked up on this module at call time, so tests can monkeypatch it.
"""

from __future__ import annotations

import shutil
from pathlib import Path


class InsufficientSpaceError(ValueError):
    """Not enough free disk space for what is about to be written."""


def free_bytes(path: str | Path) -> int:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free
