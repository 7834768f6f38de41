"""params.yaml validation: bad configuration stops before any work, naming the key."""

from __future__ import annotations

import copy
import dataclasses
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import yaml

from dmf_core.config import Config, ConfigError, DatasetSpec, SynthConfig, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


PROFILES = sorted(f"configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml"))


def test_default_and_paper_profiles_load():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.fusion.mode == "prototypes" and cfg.fusion.teacher == "text"  # the default design
    assert cfg.datasets["synthped"].layout == "finegpr"
    paper = load_config(ROOT / "configs" / "paper.yaml")
    assert paper.model.image.dim == 768 and paper.model.image.height == 256
    assert PROFILES == ["configs/paper.yaml", "configs/protocol2.yaml", "configs/protocol3.yaml"]


@pytest.mark.parametrize("protocol, splits", [(2, ["train"]), (3, ["train", "query", "gallery"])])
def test_protocol_profiles_leave_one_target_out_with_cuhksysu_always_a_source(protocol, splits):
    """Three rows, each of CUHK-SYSU and two of Market-1501, MSMT17, CUHK03-NP, evaluated on the
    third; the rest is the paper profile (DMF pretraining is Stage I of every row)."""
    cfg = load_config(ROOT / "configs" / f"protocol{protocol}.yaml")
    paper = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    mine = yaml.safe_load((ROOT / "configs" / f"protocol{protocol}.yaml").read_text())
    targets = {"market1501", "msmt17", "cuhk03np"}
    assert set(cfg.evaluate.targets) == targets and cfg.finetune.splits == splits
    left_out = []
    for row in cfg.finetune.sources:
        parts = row.split("+")
        assert "cuhksysu" in parts and len(parts) == 3
        left_out += list(targets - set(parts))
    assert sorted(left_out) == sorted(targets)
    assert cfg.datasets["cuhksysu"].layout == "cuhksysu"
    for section in ("pretrain", "model", "fusion", "loss", "captions", "augment", "train"):
        assert mine[section] == paper[section], section


MAPPING_VALUES = {"captions.viewpoint_words"}  # one setting each, whose value is a mapping


def _leaf_keys(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        out |= _leaf_keys(value, path) if isinstance(value, dict) and path not in MAPPING_VALUES else {path}
    return out


def test_paper_profile_differs_only_in_values():
    """Same code for demo and paper: the two profiles have the same keys, down to every leaf.

    Except what each profile names itself: its datasets (and their optional keys) and the
    SynthPed domains it generates (the paper profile generates none)."""
    def keys(path: Path) -> set[str]:
        tree = yaml.safe_load(path.read_text())
        return {k for k in _leaf_keys(tree) if not k.startswith("datasets.")
                and not k.startswith(("synth.sp_market.", "synth.sp_cuhk.", "synth.sp_msmt."))}

    demo = keys(ROOT / "params.yaml")
    for profile in PROFILES:
        other = keys(ROOT / profile)
        assert not demo - other, f"in params.yaml only, not in {profile}: {sorted(demo - other)}"
        assert not other - demo, f"in {profile} only: {sorted(other - demo)}"


# What a profile may leave out, and what leaving it out means: a dataset entry's optional keys and
# the SynthPed domains a profile does not generate. Every other field has no default.
OPTIONAL_FIELDS = {
    (DatasetSpec, "location"): None,
    (DatasetSpec, "registry"): None,
    (DatasetSpec, "sha256"): None,
    (DatasetSpec, "allow_partial"): False,
    (SynthConfig, "sp_market"): None,
    (SynthConfig, "sp_cuhk"): None,
    (SynthConfig, "sp_msmt"): None,
}


def _unwrap(tp):
    """The dataclass (or mapping of dataclasses) inside ``X | None``, else ``tp``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _schema_gaps(cls, data, prefix: str = "") -> tuple[list[str], list[str]]:
    """(leaves of the schema missing from ``data``, keys of ``data`` the schema does not know)."""
    missing, unknown = [], []
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown += [f"{prefix}{k}" for k in data if k not in names]
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.name not in data:
            if (cls, f.name) not in OPTIONAL_FIELDS:
                missing.append(key)
            continue
        value, tp = data[f.name], _unwrap(hints[f.name])
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            sub = _schema_gaps(tp, value, f"{key}.")
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            item = typing.get_args(tp)[1]
            subs = [_schema_gaps(item, v, f"{key}.{k}.") for k, v in value.items()]
            sub = ([m for s in subs for m in s[0]], [u for s in subs for u in s[1]])
        else:
            continue
        missing += sub[0]
        unknown += sub[1]
    return missing, unknown


@pytest.mark.parametrize("profile", ["params.yaml", *PROFILES])
def test_every_config_field_is_set_in_the_profile(profile):
    """Every leaf of the schema is spelled out in both profiles, and they hold no key it lacks."""
    missing, unknown = _schema_gaps(Config, yaml.safe_load((ROOT / profile).read_text()))
    assert not missing, f"{profile} lacks {missing}"
    assert not unknown, f"{profile} has keys the schema does not know: {unknown}"


def _all_dataclasses(cls, seen=None) -> list:
    seen = [] if seen is None else seen
    if cls in seen:
        return seen
    seen.append(cls)
    for tp in typing.get_type_hints(cls).values():
        tp = _unwrap(tp)
        if typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        if dataclasses.is_dataclass(tp):
            _all_dataclasses(tp, seen)
    return seen


def test_no_default_that_could_differ_from_the_profiles():
    """Only OPTIONAL_FIELDS keep a default, and it is what leaving the key out means."""
    defaults = {(cls, f.name): (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for cls in _all_dataclasses(Config) for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    named = {f"{cls.__name__}.{name}": value for (cls, name), value in defaults.items()}
    assert defaults == OPTIONAL_FIELDS, f"defaults in dmf_core/config.py: {named}"
    for profile in ("params.yaml", *PROFILES):  # the profiles load those values
        cfg = load_config(ROOT / profile)
        for name, spec in cfg.datasets.items():
            given = yaml.safe_load((ROOT / profile).read_text())["datasets"][name]
            for key in ("location", "registry", "sha256", "allow_partial"):
                if key not in given:
                    assert getattr(spec, key) == OPTIONAL_FIELDS[(DatasetSpec, key)], (profile, name, key)


def test_every_missing_key_is_an_error_naming_it(params_dict, tmp_path):
    """Deleting any required key from params.yaml stops loading, naming the key and the file."""
    required = sorted(k for k in _leaf_keys(params_dict)
                      if not k.startswith(("datasets.", "synth.sp_")))
    assert "finetune.momentum" in required and "finetune.min_lr_ratio" in required
    for key in required:
        data = copy.deepcopy(params_dict)
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        del node[leaf]
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: missing"):
            config_from_dict(data)
    data = copy.deepcopy(params_dict)
    del data["augment"]["pad"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: augment.pad: missing \(expected int"):
        load_config(path)


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
