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
