"""The dmf_core files a script runs: its import closure, read from the source (no import).

The one definition of "the code a stage runs": dvc.yaml lists it as each stage's deps
(tests/test_dvc_deps.py), and the resume fingerprint hashes it for the training loop
(:func:`dmf_core.train.fingerprint.code_digest`).

Every ``import`` and ``from ... import`` statement counts, at module level or inside a function,
so a lazily imported module is part of the closure as much as one imported at the top. Package
``__init__.py`` files of every imported module count too (Python runs them first). The one
exception is a package's module-level ``__getattr__`` (PEP 562): it runs only when code asks the
package for that attribute (``from dmf_core import FeatureExtractor``), which no stage does; a
test checks that.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the folder that holds the dmf_core package
PACKAGE = "dmf_core"


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """The source file of a ``dmf_core`` module or package under ``root``, or None."""
    base = root.joinpath(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def runs_code(path: Path) -> bool:
    """False for a file that holds nothing but a docstring (most ``__init__.py``): editing it
    cannot change what a stage does, so it is not a dependency."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return bool(body)


def _package_inits(module: str, root: Path) -> list[Path]:
    parts = module.split(".")
    return [f for i in range(1, len(parts) + 1) if (f := module_file(".".join(parts[:i]), root))
            and f.name == "__init__.py"]


def _own_module(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """The ``dmf_core`` modules ``path`` imports anywhere in its body."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    if is_package:
        tree.body = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name == "__getattr__")]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = _own_module(path, root).split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {m for m in out if m.split(".")[0] == PACKAGE and module_file(m, root)}


def import_closure(script: Path, root: Path = ROOT) -> set[Path]:
    """Every ``dmf_core`` file that running ``script`` can execute, relative to ``root``."""
    seen: set[Path] = set()
    todo = [Path(script).resolve()]
    while todo:
        path = todo.pop()
        for module in imported_modules(path, root):
            for f in [*_package_inits(module, root), module_file(module, root)]:
                if f not in seen:
                    seen.add(f)
                    todo.append(f)
    return {p.relative_to(root) for p in seen if runs_code(p)}


def as_deps(files: set[Path], root: Path = ROOT) -> list[str]:
    """``files`` (relative to ``root``) as DVC deps: a folder where every ``.py`` file under it
    that runs code is in ``files`` (the largest such folder), else the files themselves. Sorted."""
    files = set(files)

    def whole(folder: Path) -> bool:
        return all(p.relative_to(root) in files for p in (root / folder).rglob("*.py") if runs_code(p))

    out = set()
    for f in files:
        best, folder = f, f.parent
        while folder != Path(".") and whole(folder):
            best, folder = folder, folder.parent
        out.add(best)
    return sorted(str(p) for p in out if not any(q in p.parents for q in out))


def closure_digest(script: Path, root: Path = ROOT) -> str:
    """sha256 over (path, content) of ``script`` and every file of its closure, in sorted order."""
    script = Path(script).resolve()
    files = sorted({script.relative_to(root), *import_closure(script, root)})
    h = hashlib.sha256()
    for rel in files:
        h.update(f"{rel.as_posix()}\0{hashlib.sha256((root / rel).read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()
