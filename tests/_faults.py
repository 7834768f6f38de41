"""Builders of hostile inputs for the fault-injection tests (tests/test_faults_*.py).

Every builder writes a small file and returns its path; nothing here touches the network.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def good_jpeg(size=(16, 32), color=(90, 140, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_header(width: int, height: int, pixel_rows: int = 2, row_width: int = 2) -> bytes:
    """A PNG whose IHDR declares ``width x height`` (valid CRCs) but carries only a tiny RGB body."""
    raw = b"".join(b"\x00" + b"\x80" * (3 * row_width) for _ in range(pixel_rows))
    return (b"\x89PNG\r\n\x1a\n"
            + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(raw))
            + _png_chunk(b"IEND", b""))


def hostile_images() -> dict[str, bytes]:
    """name -> bytes of each kind of bad image (all with an image extension)."""
    jpeg = good_jpeg()
    return {
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "png_bogus_size": png_with_header(64, 64),              # declares 64x64, carries 2x2
        "png_enormous": png_with_header(200_000, 200_000),      # 4e10 px: the bomb guard must refuse
        "text_as_jpg": b"<html><body>404 Not Found</body></html>\n" * 4,
        "empty_jpg": b"",
    }


# ---------------------------------------------------------------------------------------------
# Pickles that would run code
# ---------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this creates ``marker`` (a directory): proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def evil_torch_file(path: Path, marker: Path, wrap: bool = True) -> Path:
    """A torch.save file whose pickle calls os.mkdir(marker) when fully unpickled."""
    import torch

    obj = {"pos_embed": torch.zeros(1, 2, 4), "evil": Payload(marker)} if wrap else Payload(marker)
    torch.save(obj, path)
    return path


# ---------------------------------------------------------------------------------------------
# A throw-away DVC project (for kill / Ctrl-C tests)
# ---------------------------------------------------------------------------------------------

PROJECT_FILES = ["dvc.yaml", ".dvcignore", "stages", "dmf_core", "pyproject.toml", ".gitignore"]


def env_with_venv() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", CLEARML_OFFLINE_MODE="1", DMF_LOG_LEVEL="WARNING",
               OMP_NUM_THREADS="1")
    return env


def run(args: list[str], cwd: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env_with_venv(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def make_project(dest: Path, params: dict) -> Path:
    """Copy the pipeline into ``dest`` with ``params`` as params.yaml; a git + DVC repo, committed."""
    import yaml

    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    (dest / ".dvc").mkdir(exist_ok=True)
    for name in ("config", ".gitignore"):
        if (ROOT / ".dvc" / name).exists():
            shutil.copy2(ROOT / ".dvc" / name, dest / ".dvc" / name)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # dvc 3.67.1 rejects a list under a stage's plots `y:` ("expected str"); until dvc.yaml is fixed
    # (reported in docs/reliability.md), the throw-away copy plots one column so the pipeline loads.
    dvc_yaml = dest / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace("y: [loss, lr]", "y: loss"))
    run(["git", "init", "-q"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "fault project"], dest)
    return dest


def tree_digest(*roots: Path) -> dict[str, str]:
    """relative path -> sha256 of every regular file below (or at) each root."""
    import hashlib

    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
