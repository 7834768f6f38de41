"""The shape of the code: limits that keep it readable."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80  # about a screen


def _function_lengths(path: Path) -> list[tuple[str, int]]:
    """(qualified name, lines from ``def`` to its last line) of every function and method in ``path``."""
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((prefix + child.name, child.end_lineno - child.lineno + 1))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), "")
    return out


def test_no_function_in_dmf_core_is_over_80_lines():
    files = sorted((ROOT / "dmf_core").rglob("*.py"))
    assert files
    too_long = [f"{path.relative_to(ROOT)}:{name} ({n} lines)"
                for path in files for name, n in _function_lengths(path) if n > MAX_FUNCTION_LINES]
    assert not too_long, (f"{len(too_long)} function(s) over {MAX_FUNCTION_LINES} lines; split them into "
                          "helpers with one job each:\n" + "\n".join(too_long))


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names


def test_tests_import_helpers_as_pytest_puts_them_on_the_path():
    """``make test`` runs pytest with ``tests/`` (not the repository root) on ``sys.path``: a test that
    imports ``tests.<module>`` or another test module passes under PYTHONPATH=. and fails in CI.
    Shared helpers live in ``tests/_<name>.py``."""
    offenders = sorted(
        f"{path.name}: {name}"
        for path in (ROOT / "tests").glob("*.py")
        for name in _imported_modules(path)
        if name == "tests" or name.startswith("tests.") or name.startswith("test_")
    )
    assert not offenders, offenders
