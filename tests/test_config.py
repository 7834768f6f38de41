"""params.yaml validation: bad configuration stops before any work, naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dmf_core.config import ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_default_and_paper_profiles_load():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.fusion.mode == "shared"
    assert cfg.datasets["synthped"].layout == "finegpr"
    paper = load_config(ROOT / "configs" / "paper.yaml")
    assert paper.model.image.dim == 768 and paper.model.image.height == 256


def test_paper_profile_differs_only_in_values():
    """Same code for demo and paper: the two profiles have the same top-level keys."""
    demo = yaml.safe_load((ROOT / "params.yaml").read_text())
    paper = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    assert set(demo) == set(paper)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["fusion"].update(dimm=3), "fusion.dimm: unknown key"),
        (lambda p: p.update(bogus=1), "bogus: unknown key"),
        (lambda p: p["fusion"].update(dim="wide"), "fusion.dim: expected an integer, got 'wide'"),
        (lambda p: p["fusion"].update(dim=250), "fusion.dim: 250 is not divisible by fusion.heads=4"),
        (lambda p: p["fusion"].update(mode="both"), "fusion.mode: expected one of 'shared' | 'image_only'"),
        (lambda p: p["pretrain"].update(epochs=-2), "pretrain.epochs: expected a positive value"),
        (lambda p: p["model"]["text"].update(freeze="yes"), "model.text.freeze: expected true or false"),
        (lambda p: p["evaluate"].update(targets="sp_cuhk"), "evaluate.targets: expected a list of str"),
        (lambda p: p["evaluate"].update(targets=["nowhere"]), "dataset 'nowhere' is not listed"),
        (lambda p: p["finetune"].update(sources=["sp_msmt"]),
         "evaluate.rows: expected ['pretrain', 'sp_msmt']"),  # a source added or dropped in one list only
        (lambda p: p["evaluate"].update(rows=["sp_market", "sp_msmt", "pretrain"]),
         "evaluate.rows: expected ['pretrain', 'sp_market', 'sp_msmt']"),
        (lambda p: p.pop("fusion"), "fusion: missing"),
        (lambda p: p["pack"].update(on_corrupt="ignore"), "pack.on_corrupt: expected one of"),
    ],
)
def test_bad_values_name_the_key(params_dict, edit, message):
    edit(params_dict)
    with pytest.raises(ConfigError) as err:
        config_from_dict(params_dict)
    assert message in str(err.value)


def test_yaml_that_is_not_a_mapping(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)
    bad.write_bytes(b"seed: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


def test_stage_stops_before_work_with_one_line(tmp_path, params_dict):
    """A stage run with a bad key exits non-zero, says which key, and writes nothing."""
    params_dict["fusion"]["dim"] = 3.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_dict))
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "download.py"), "sp_market"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "fusion.dim: expected an integer, got 3.5" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize(("key", "yaml_value"), [("pretrain.lr", ".nan"), ("augment.erasing", ".inf"),
                                                 ("loss.label_smoothing", "-.inf"), ("fusion.dropout", ".NaN")])
def test_yaml_nan_and_infinities_are_refused(tmp_path, key, yaml_value):
    """YAML's .nan / .inf / -.inf parse to floats that every range check lets through."""
    section, leaf = key.split(".")
    text = (ROOT / "params.yaml").read_text()
    data = yaml.safe_load(text)
    data[section][leaf] = "@VALUE@"
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(data).replace("'@VALUE@'", yaml_value))
    with pytest.raises(ConfigError, match=rf"params\.yaml: {section}\.{leaf}: expected a finite number"):
        load_config(bad)
