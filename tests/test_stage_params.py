"""Every stage reads only config fields that its ``params:`` in dvc.yaml cover.

DVC re-runs a stage when one of its listed params changes, and only then: a field a stage reads
without listing it changes the stage's output while DVC calls the stage up to date. So each
stage instance of dvc.yaml runs here, in this process, in pipeline order, with a recording
``__getattribute__`` on every config dataclass, on two tiny profiles that between them take each
side of the switches that decide which code a stage runs (:func:`stage_params`); each leaf field
it reads must be covered by one of its params entries (``model`` covers ``model.*``,
``finetune.epochs`` only itself, ``datasets.${key}`` the entry of that foreach instance).

Not counted: reads inside the functions of ``NOT_COUNTED``, which change no output: the whole
config serialised by ``to_dict`` (model metadata and params hash: provenance; the resume
fingerprint: whether to resume, not what comes out), and pre-run checks that only refuse to start;
and the sections of ``NOT_PARAMS`` (``tracking``), which no output depends on.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from dmf_core import runtime
from dmf_core.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]

# How each dvc.yaml stage runs in-process: the stage script's main, with the arguments its cmd
# passes (the foreach key or item, the matrix item), and whether run_stage runs it distributed.
RUNNERS: dict[str, tuple[str, Callable[[dict], tuple], bool]] = {
    "download": ("download", lambda v: (v["key"],), False),
    "captions": ("captions", lambda v: (), False),
    "encode_captions": ("encode_captions", lambda v: (), False),
    "pack": ("pack", lambda v: (v["key"],), False),
    "pretrain": ("pretrain", lambda v: (), True),
    "compose": ("compose", lambda v: (v["item"],), False),
    "finetune": ("finetune", lambda v: (v["item"],), True),
    "evaluate": ("evaluate", lambda v: (v["item"]["row"], v["item"]["target"]), False),
    "report": ("report", lambda v: (), False),
}


# (module, function, why its reads are not the stage's params)
NOT_COUNTED = [
    ("dmf_core.config", "to_dict", "the whole config as provenance, params hash or resume fingerprint"),
    ("dmf_core.checks", "certain_failures",
     "the first stages refuse to start when a later stage would certainly fail: reads what those need"),
    ("stage:evaluate", "check_listed", "refuses a cell outside the matrix: a target added to "
                                       "evaluate.targets must not re-run every cell"),
    ("dmf_core.data.loading.row_plan", "check_listed", "refuses a row outside finetune.sources: adding "
                                                       "a row must not re-run the others"),
    ("dmf_core.data.loading.row_plan", "check_plan", "refuses a plan composed for other splits or "
                                                     "layouts (compose lists those params)"),
]


# Config sections no stage's output depends on, so no stage lists them: where scalars are
# mirrored (switching ClearML on must not re-train).
NOT_PARAMS = {"tracking": "ClearML mirroring; the metrics JSON is the record"}


def _stage_module(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_params_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lookup(tree, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _resolve(text: str, context: dict, params: dict) -> str:
    """``${key}``, ``${item}``, ``${item.row}`` from the loop's context, else from params."""
    def value(match: re.Match) -> str:
        name = match.group(1).strip()
        head = name.split(".")[0]
        return str(_lookup(context if head in context else params, name))

    return re.sub(r"\$\{([^}]+)\}", value, text)


def dvc_stage_instances(params: dict) -> list[tuple[str, str, dict, list[str]]]:
    """(stage, instance name, loop context, resolved params entries) in dvc.yaml's order, foreach
    and matrix stages expanded against ``params`` the way DVC does."""
    out = []
    for stage, spec in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        if "foreach" in spec:
            over = _lookup(params, spec["foreach"].strip()[2:-1])
            contexts = ([{"key": k, "item": v} for k, v in over.items()] if isinstance(over, dict)
                        else [{"item": v} for v in over])
            names = [f"{stage}@{c.get('key', c['item'])}" for c in contexts]
            body = spec["do"]
        elif "matrix" in spec:
            axes = {k: _lookup(params, v.strip()[2:-1]) if isinstance(v, str) else v
                    for k, v in spec["matrix"].items()}
            contexts = [{"item": dict(zip(axes, combo))} for combo in _product(list(axes.values()))]
            names = [f"{stage}@{'-'.join(str(v) for v in c['item'].values())}" for c in contexts]
            body = spec
        else:
            contexts, names, body = [{}], [stage], spec
        for name, context in zip(names, contexts):
            entries = []
            for entry in body.get("params", []):
                if isinstance(entry, dict):  # {file: [keys]}: only params.yaml is the config
                    entries += [k for f, keys in entry.items() if f == "params.yaml" for k in keys or []]
                else:
                    entries.append(_resolve(entry, context, params))
            out.append((stage, name, context, entries))
    return out


def _product(axes: list[list]) -> list[tuple]:
    combos = [()]
    for axis in axes:
        combos = [(*c, v) for c in combos for v in axis]
    return combos


def covered(read: str, entries: list[str]) -> bool:
    return any(read == e or read.startswith(e + ".") for e in entries)


def config_classes() -> list[type]:
    seen: list[type] = []

    def visit(cls: type) -> None:
        if cls in seen:
            return
        seen.append(cls)
        for tp in typing.get_type_hints(cls).values():
            for arg in (tp, *typing.get_args(tp)):
                if typing.get_origin(arg) is dict:
                    arg = typing.get_args(arg)[1]
                if dataclasses.is_dataclass(arg):
                    visit(arg)

    visit(Config)
    return seen


def _is_section(value) -> bool:
    """A config object or a mapping of them (``datasets``): reading it is a step on the way to
    its fields, which are recorded themselves."""
    if dataclasses.is_dataclass(value):
        return True
    return isinstance(value, dict) and bool(value) and all(dataclasses.is_dataclass(v) for v in value.values())


def config_paths(cfg: Config) -> dict[int, str]:
    """id of every config object inside ``cfg`` -> its dotted path ('' for ``cfg`` itself)."""
    out: dict[int, str] = {}

    def visit(obj, path: str) -> None:
        out[id(obj)] = path
        for f in dataclasses.fields(obj):
            value = object.__getattribute__(obj, f.name)
            where = f"{path}.{f.name}" if path else f.name
            if dataclasses.is_dataclass(value):
                visit(value, where)
            elif _is_section(value):
                for key, item in value.items():
                    visit(item, f"{where}.{key}")

    visit(cfg, "")
    return out


class ReadRecorder:
    """Records ``path.field`` for each leaf field of ``cfg`` read while installed and not paused."""

    def __init__(self, cfg: Config):
        self.paths = config_paths(cfg)
        self.reads: set[str] = set()
        self.paused = 0

    def install(self, monkeypatch: pytest.MonkeyPatch, stage_modules: dict) -> None:
        for cls in config_classes():
            monkeypatch.setattr(cls, "__getattribute__", self._getattribute(cls), raising=False)
        for owner, name, _ in NOT_COUNTED:
            owner_module = (stage_modules[owner.split(":")[1]] if owner.startswith("stage:")
                            else importlib.import_module(owner))
            original = getattr(owner_module, name)
            quiet = self._quiet(original)
            # every module bound to the original (``from x import f`` copies the binding), or to
            # the wrapper of an earlier test (a module imported while that test ran keeps it)
            for module in [*list(sys.modules.values()), *stage_modules.values()]:
                bound = getattr(module, name, None)
                if bound is original or (isinstance(bound, types.FunctionType)
                                         and getattr(bound, "__wrapped__", None) is original):
                    monkeypatch.setattr(module, name, quiet)

    def _getattribute(self, cls: type):
        fields = {f.name for f in dataclasses.fields(cls)}
        base = object.__getattribute__

        def getattribute(obj, name):
            value = base(obj, name)
            if name in fields and not self.paused:
                where = self.paths.get(id(obj))
                if where is not None and not _is_section(value):
                    self.reads.add(f"{where}.{name}" if where else name)
            return value

        return getattribute

    def _quiet(self, fn):
        @functools.wraps(fn)  # sets __wrapped__
        def quiet(*args, **kwargs):
            self.paused += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused -= 1

        return quiet


def stage_params(tiny: dict, profile: str = "tiny") -> dict:
    """The tiny profile cut further, one side of each switch per profile (:data:`PROFILES`).

    ``tiny``: three datasets, one fine-tuning row of two of them, 2 x 2 evaluation cells; fine-tuning with SGD
    so that its momentum is read too (pretraining keeps AdamW); the shuffled-captions control
    (shared mode), whose code runs all that own captions run and more. ``controls``: the other side
    of the switches that stay at their default in ``tiny``, on two datasets (2 x 1 cells): a row
    of both, balanced, on their train, query and gallery images (Protocol-3), packed
    images resized to the model's input, captions without the conditions, the attribute-head
    control (whose code runs all that ``image_only`` runs and more), decoding on the training
    device, re-ranking and flipped features at evaluation. ``teachers``: ``controls`` with language
    as a teacher (the identities' caption prototypes, whose states the encode_captions stage
    writes) instead of the attribute head."""
    p = copy.deepcopy(tiny)
    names = ("synthped", "sp_market", "sp_cuhk") if profile == "tiny" else ("synthped", "sp_market")
    p["datasets"] = {k: p["datasets"][k] for k in names}
    for domain in ("sp_cuhk", "sp_msmt"):
        if domain not in names:
            p["synth"].pop(domain)
    p["pretrain"]["holdout_ids"] = 2
    row = "sp_market+sp_cuhk" if profile == "tiny" else "synthped+sp_market"
    p["finetune"].update(sources=[row], optimizer="sgd")
    p["evaluate"].update(rows=["pretrain", row], targets=[n for n in names if n != "synthped"])
    if profile == "tiny":
        p["fusion"].update(mode="shared", captions="shuffled")
    else:
        p["finetune"].update(sampler="balanced", splits=["train", "query", "gallery"])
        p["pack"]["resize"] = [p["model"]["image"]["height"], p["model"]["image"]["width"]]
        p["evaluate"].update(rerank=True, flip=True)
        p["train"]["decode"] = "device"
        p["fusion"]["mode"] = "attributes" if profile == "controls" else "prototypes"
        p["captions"]["content"] = "person"
    return p


# Each runs every stage instance its params give: the branches a stage takes depend on them.
PROFILES = ("tiny", "controls", "teachers")


def test_every_dvc_stage_has_a_runner(params_dict):
    stages = {stage for stage, *_ in dvc_stage_instances(params_dict)}
    assert stages <= set(RUNNERS), f"add the stages {sorted(stages - set(RUNNERS))} to RUNNERS"


def test_params_resolve_per_instance(params_dict):
    """The foreach key / item and the matrix item resolve inside each instance's params entries."""
    instances = {name: entries for _, name, _, entries in dvc_stage_instances(params_dict)}
    assert "datasets.sp_cuhk" in instances["download@sp_cuhk"]
    assert "datasets.sp_market" not in instances["download@sp_cuhk"]
    assert {"evaluate@pretrain-sp_msmt", "finetune@sp_market", "pack@synthped"} <= set(instances)
    assert covered("model.image.depth", ["model"]) and not covered("finetune.sources", ["finetune.epochs"])
    assert not covered("fusion.dimension", ["fusion.dim"])


@pytest.mark.parametrize("profile", PROFILES)
def test_each_stage_reads_only_the_params_it_lists(tiny_params, tmp_path, monkeypatch, profile):
    params = stage_params(tiny_params, profile)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DMF_DEBUG", "1")  # run_stage raises instead of exiting
    cfg = load_config("params.yaml")
    monkeypatch.setattr(runtime, "load_config", lambda *a, **k: cfg)  # validation reads everything
    instances = dvc_stage_instances(params)
    if unknown := sorted({stage for stage, *_ in instances} - set(RUNNERS)):
        pytest.fail(f"dvc.yaml stages {unknown}: add them to RUNNERS")
    modules = {stage: _stage_module(RUNNERS[stage][0]) for stage in {stage for stage, *_ in instances}}
    recorder = ReadRecorder(cfg)
    recorder.install(monkeypatch, modules)

    problems = []
    for stage, name, context, entries in instances:  # dvc.yaml's order: the pipeline's
        _, args, distributed = RUNNERS[stage]
        main, stage_args = modules[stage].main, args(context)
        recorder.reads.clear()
        runtime.run_stage(name, lambda c, main=main, stage_args=stage_args: main(c, *stage_args),
                          distributed=distributed)
        assert recorder.reads, f"{name}: no config read recorded (is the recorder installed?)"
        unlisted = sorted(r for r in recorder.reads if not covered(r, [*entries, *NOT_PARAMS]))
        if unlisted:
            problems.append(f"{name} reads {unlisted}, not covered by its params {entries}")
    assert os.path.isfile("reports/eval_matrix.json")
    assert not problems, "dvc.yaml params lists miss what stages read:\n" + "\n".join(problems)
