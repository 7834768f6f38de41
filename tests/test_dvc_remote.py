"""`dmf doctor`'s DVC remote line, read through DVC's own config API (all four levels)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dmf_core.cli import _dvc_remote


def dvc(*args: str, cwd) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, check=True, capture_output=True, timeout=120)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A fresh git + DVC repository as the working directory; its own global and system levels."""
    for level in ("global", "system"):
        (tmp_path / level).mkdir()
        monkeypatch.setenv(f"DVC_{level.upper()}_CONFIG_DIR", str(tmp_path / level))
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc("init", "-q", cwd=root)
    monkeypatch.chdir(root)
    return root


def test_no_remote_says_how_to_add_one(repo):
    assert _dvc_remote().startswith("none: `dvc remote add -d store <url>`")


def test_repo_default_then_local_override_then_non_default(repo, tmp_path):
    dvc("remote", "add", "-d", "store", str(tmp_path / "x"), cwd=repo)
    assert _dvc_remote() == f"store -> {tmp_path / 'x'} (default)"

    dvc("remote", "add", "--local", "-d", "mine", str(tmp_path / "y"), cwd=repo)  # .dvc/config.local
    assert _dvc_remote() == f"mine -> {tmp_path / 'y'} (default)"

    dvc("remote", "default", "--local", "--unset", cwd=repo)
    dvc("remote", "default", "--unset", cwd=repo)
    assert _dvc_remote() == (f"store -> {tmp_path / 'x'}, mine -> {tmp_path / 'y'} "
                             "(no default: `dvc remote default <name>`)")


def test_global_default_seen_from_a_subdirectory(repo, tmp_path, monkeypatch):
    dvc("remote", "add", "--global", "-d", "shared", str(tmp_path / "z"), cwd=repo)
    (repo / "sub").mkdir()
    monkeypatch.chdir(repo / "sub")
    assert _dvc_remote() == f"shared -> {tmp_path / 'z'} (default)"


def test_a_default_that_names_no_remote(repo, tmp_path):
    dvc("remote", "add", "store", str(tmp_path / "x"), cwd=repo)
    with open(repo / ".dvc" / "config", "a") as f:
        f.write("[core]\n    remote = gone\n")
    assert "the default 'gone' is not defined" in _dvc_remote()


def test_a_broken_config_is_reported_not_raised(repo):
    (repo / ".dvc" / "config").write_text("[core\nremote = \n")
    assert _dvc_remote().startswith("unreadable DVC config:")
