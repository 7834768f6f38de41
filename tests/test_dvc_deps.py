"""A stage's DVC deps are the code it runs, and the package's parts import each other one way.

Each stage script's import closure (dmf_core/code_deps.py: every import statement, at module level
or inside a function, followed through dmf_core) must be exactly the dmf_core entries of its
`deps:` in dvc.yaml, as folders where it runs every file of a folder. Then an edit to any file
a stage runs re-runs that stage, and an edit elsewhere does not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from dmf_core.code_deps import ROOT, as_deps, import_closure, imported_modules, module_file, runs_code

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _stage_body(spec: dict) -> dict:
    return spec.get("do", spec)


def _script(name: str, spec: dict) -> Path:
    cmd = _stage_body(spec)["cmd"].split()
    assert cmd[:2] == ["python", f"stages/{name}.py"], f"{name}: cmd {cmd} is not `python stages/{name}.py ...`"
    return ROOT / cmd[1]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_code_deps_are_the_stages_import_closure(name):
    spec = STAGES[name]
    deps = [d for d in _stage_body(spec)["deps"] if isinstance(d, str)]
    script = _script(name, spec)
    assert str(script.relative_to(ROOT)) in deps, f"{name}: its own script is not a dep"
    listed = sorted(d for d in deps if d.startswith("dmf_core"))
    expected = as_deps(import_closure(script))
    missing, extra = sorted(set(expected) - set(listed)), sorted(set(listed) - set(expected))
    assert not missing and not extra, (
        f"dvc.yaml stage {name!r}: code deps differ from what {script.relative_to(ROOT)} imports.\n"
        f"  imported but not a dep: {missing}\n  a dep but not imported (or a folder it uses only "
        f"in part): {extra}\n  expected exactly:\n" + "\n".join(f"    - {d}" for d in expected))


def test_closure_follows_imports_inside_functions():
    """pretrain imports eval/ranking.py only inside the feature-health function: it still counts."""
    health = ROOT / "dmf_core/train/health.py"
    top_level = {n.module for n in ast.parse(health.read_text()).body if isinstance(n, ast.ImportFrom)}
    assert "dmf_core.eval.ranking" not in top_level
    assert "dmf_core.eval.ranking" in imported_modules(health)
    assert Path("dmf_core/eval/ranking.py") in import_closure(ROOT / "stages/pretrain.py")
    assert Path("dmf_core/train/loop.py") not in import_closure(ROOT / "stages/evaluate.py")


def test_no_stage_reaches_a_lazy_package_attribute():
    """The closure leaves out a package's PEP 562 ``__getattr__`` (``from dmf_core import
    FeatureExtractor``); that holds only while no stage's code asks the package for it."""
    for name, spec in STAGES.items():
        script = _script(name, spec)
        for path in [script, *(ROOT / f for f in import_closure(script))]:
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module == "dmf_core":
                    names = {a.name for a in node.names}
                    assert "FeatureExtractor" not in names, f"{path}: imports dmf_core.FeatureExtractor"


def _unit(module: str) -> str:
    """The part of dmf_core a module belongs to: ``dmf_core.<x>``, or ``dmf_core.data.<x>``."""
    parts = module.split(".")
    return ".".join(parts[:3] if parts[1:2] == ["data"] and len(parts) > 2 else parts[:2])


def _unit_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "dmf_core").rglob("*.py")):
        if not runs_code(path):
            continue
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        here = _unit(module)
        graph.setdefault(here, set()).update(u for m in imported_modules(path) if module_file(m)
                                             and (u := _unit(m)) != here
                                             and u not in ("dmf_core", "dmf_core.data"))
    return graph


def test_no_import_cycle_between_parts_of_the_package():
    graph = _unit_graph()
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                pytest.fail("import cycle between parts of dmf_core: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert "dmf_core.data.sources" not in graph["dmf_core.data.store"]  # packing needs no acquisition code


def _documented_graph() -> dict[str, set[str]]:
    """The import graph block of docs/architecture.md: ``part ─► a, b`` per line."""
    text = (ROOT / "docs/architecture.md").read_text()
    block = text.split("<!-- import graph -->", 1)[1].split("```")[1]
    graph = {}
    for line in block.strip().splitlines():
        part, _, deps = line.partition("─►")
        graph[part.strip()] = {d.strip() for d in deps.split(",")}
    return graph


def test_the_documented_import_graph_is_the_code_s():
    def short(unit: str) -> str:
        return unit.removeprefix("dmf_core.").replace(".", "/")

    everywhere = {"config", "paths"}
    actual = {short(u): {short(d) for d in deps} - everywhere for u, deps in _unit_graph().items()}
    actual = {u: deps for u, deps in actual.items() if deps}
    assert _documented_graph() == actual, "docs/architecture.md's import graph is out of date:\n" + "\n".join(
        f"{u:<14} ─► {', '.join(sorted(d))}" for u, d in sorted(actual.items()))
