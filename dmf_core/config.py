"""params.yaml -> typed, validated configuration.

Every stage loads its configuration through :func:`load_config` before doing any work, so an
unknown key, a value of the wrong type or an inconsistent combination stops the stage at once
with a message that names the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from dmf_core.paths import RAW
from dmf_core.rows import row_parts, row_problem


class ConfigError(ValueError):
    """A params file that does not match the schema; the message names the key."""


# ---------------------------------------------------------------------------------------------
# Schema
#
# No pipeline setting has a default here: params.yaml and configs/paper.yaml spell out every key,
# and a key missing from a params file is a ConfigError naming it, not a value that silently
# differs from the profile. Defaults remain only for what a profile may legitimately leave out:
# a dataset entry's optional keys (DatasetSpec) and SynthPed domains a profile does not generate
# (SynthConfig); tests/test_config.py holds the list.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    layout: Literal["finegpr", "market", "msmt17", "cuhk03np", "randperson", "cuhksysu", "csv"]
    source: Literal["synth", "url", "archive", "dir"]
    location: str | None = None  # URL, archive path or directory (not for synth)
    registry: str | None = None  # registry key of a real dataset (issue: real datasets)
    sha256: str | None = None
    allow_partial: bool = False


@dataclass(frozen=True)
class SynthFineGPR:
    ids: int
    images_per_id: int


@dataclass(frozen=True)
class SynthDomain:
    style: str
    train_ids: int
    test_ids: int


@dataclass(frozen=True)
class SynthConfig:
    seed: int
    height: int
    width: int
    synthped: SynthFineGPR
    sp_market: SynthDomain | None = None
    sp_cuhk: SynthDomain | None = None
    sp_msmt: SynthDomain | None = None

    def domain(self, name: str) -> SynthDomain:
        spec = getattr(self, name, None)
        if not isinstance(spec, SynthDomain):
            raise ConfigError(f"synth.{name}: no SynthPed domain of that name is configured")
        return spec


@dataclass(frozen=True)
class CaptionsConfig:
    dataset: str
    per_image: int
    seed: int
    on_bad_rows: Literal["fail", "skip"]
    viewpoint_words: dict[str, list[float]]
    # Where the captions come from (docs/captions.md#caption-sources): generated from a FineGPR
    # attribute table, released FineGPR-C captions, the manifest's caption column (layout csv), or
    # the published caption JSON of CUHK-PEDES, ICFG-PEDES or RSTPReid.
    source: Literal["attributes", "finegpr_c", "manifest", "cuhk_pedes", "icfg_pedes", "rstpreid"]
    file: str  # what `source` reads (the attribute table, a caption JSON, the manifest); a DVC dependency
    images: str | None  # published JSONs: the folder under data/raw/<dataset>/ their image paths start in
    # What a generated caption states: the attributes, viewpoint and the conditions (weather,
    # time of day, scene) ("full"), or the attributes and viewpoint only ("person").
    content: Literal["full", "person"]


@dataclass(frozen=True)
class PackConfig:
    resize: list[int] | None
    on_corrupt: Literal["fail", "skip"]


@dataclass(frozen=True)
class ImageEncoderConfig:
    arch: Literal["vit"]
    depth: int
    dim: int
    heads: int
    patch: int
    stride: int
    height: int
    width: int
    drop_path: float
    pretrained: str | None


@dataclass(frozen=True)
class TextEncoderConfig:
    name: str
    freeze: bool
    max_length: int


@dataclass(frozen=True)
class ModelConfig:
    image: ImageEncoderConfig
    text: TextEncoderConfig


@dataclass(frozen=True)
class FusionConfig:
    dim: int
    layers: int
    heads: int
    mlp_ratio: float
    dropout: float
    drop_path: float
    # shared: images + captions through one encoder (the method); image_only: the baseline;
    # attributes: the attribute-head control (the captions' attributes as labels, no language);
    # prototypes / phrases: language as a teacher (dmf_core/model/teacher.py): the identities'
    # caption embeddings as class prototypes / the attribute values' phrases as attribute classes.
    mode: Literal["shared", "image_only", "attributes", "prototypes", "phrases"]
    # Weight of the identity-aware image<->caption contrastive term (every caption of the same
    # identity is a positive of an image): what pulls an image toward its identity's captions.
    align_weight: float
    align_temperature: float
    # What that term aligns: BN(f) of each modality, the retrieval feature itself (neck), or a
    # two-layer projection of it per modality (head), so the retrieval feature is not the aligned one.
    align_on: Literal["neck", "head"]
    # Whose captions an identity reads: its own, or another identity's (the shuffled-captions control).
    captions: Literal["own", "shuffled"]
    # The teacher head's vectors (prototypes / phrases): the text encoder's embeddings, or learned
    # vectors of the same shape (the no-language twin); its loss weight and cosine temperature.
    teacher: Literal["text", "learned"]
    teacher_weight: float
    teacher_temperature: float
    # The attribute-head control's head (the captions' 13 attributes as labels on BN(f)) added to
    # any mode's pretraining: a combination, such as the text prototypes with it.
    attribute_head: bool


@dataclass(frozen=True)
class LossConfig:
    id_weight: float
    triplet_weight: float
    # Batch-hard triplet on L2-normalised f: hinge max(0, d_ap - d_an + margin), or the soft
    # margin log(1 + exp(d_ap - d_an)) when null. 0 by default: f's distances are a few
    # hundredths, so a 0.3 margin is never reached and no anchor is ever done (docs/training.md,
    # "The triplet at margin 0").
    triplet_margin: float | None
    # What the triplet compares: L2-normalised f, whose component shared by every image keeps
    # all distances small, or f less its batch mean first (docs/training.md, "The triplet at
    # its margin").
    triplet_feature: Literal["f", "centred", "raw"]
    # How the margin compares the hardest positive and negative distance: additive, d_ap - d_an +
    # margin; or ratio, log d_ap - log d_an + margin, which no uniform shrinking of the distances
    # can lower, so the collapse of f toward one shared vector earns the loss nothing
    # (docs/training.md, "The ratio triplet").
    triplet_margin_type: Literal["additive", "ratio"]
    label_smoothing: float
    # Share of the captions in the ID loss, (1 - s) CE(images) + s CE(captions), at most 0.5:
    # a caption names its identity, so an unbounded share lets the classifier read captions.
    caption_id_share: float
    # The attribute-head control: weight of its mean per-attribute cross-entropy.
    attribute_weight: float


@dataclass(frozen=True)
class AugmentConfig:
    flip: float
    pad: int
    erasing: float
    mean: list[float]
    std: list[float]


@dataclass(frozen=True)
class TrainConfig:
    nproc: int
    num_workers: int
    threads: int
    precision: Literal["auto", "fp32", "bf16"]
    checkpoint_every: int
    # torch.compile mode for the training forward/backward (null: eager). On CUDA,
    # reduce-overhead adds CUDA graphs: the paper's batch of 64 is launch-bound without them.
    compile: Literal["default", "reduce-overhead"] | None
    # Where training images are decoded and augmented: in the loader's workers, one at a time, or
    # on the training device, a batch at a time (dmf_core/data/loading/device_augment.py; for GPUs whose
    # CPU workers cannot keep up). Same images from the same seed on the CPU.
    decode: Literal["worker", "device"]


@dataclass(frozen=True)
class StageTrainConfig:
    epochs: int
    P: int
    K: int
    optimizer: Literal["sgd", "adamw"]
    lr: float
    weight_decay: float
    bias_lr_factor: float
    warmup_epochs: int
    grad_clip: float | None
    accumulate: int
    momentum: float  # SGD only
    # End of the cosine schedule, a share of the base lr (timm's lr_min = min_lr_ratio x lr).
    min_lr_ratio: float
    # Decay of the exponential moving average of the weights the stage saves (0: the last weights).
    ema: float


@dataclass(frozen=True)
class PretrainConfig(StageTrainConfig):
    dataset: str
    # Identities kept out of pretraining (the last ones by label): the images not trained on that
    # feature health and caption->image retrieval are measured on.
    holdout_ids: int


@dataclass(frozen=True)
class FinetuneConfig(StageTrainConfig):
    # The matrix's fine-tuning rows: a dataset, or several trained on together joined by '+'
    # (dmf_core/rows.py); identities and cameras are namespaced per dataset.
    sources: list[str]
    # How a P x K batch draws from a row of several datasets: P identities from their union
    # (uniform), or P / parts from each dataset (balanced). One dataset: the same either way.
    sampler: Literal["uniform", "balanced"]
    # The splits of each source a row trains on: [train] (Protocol-2), or [train, query, gallery]
    # (Protocol-3; test identities kept apart from train ones, Market's distractors dropped).
    splits: list[Literal["train", "query", "gallery"]]


@dataclass(frozen=True)
class EvaluateConfig:
    targets: list[str]
    # The matrix's rows: 'pretrain' (the pretrained model) then finetune.sources, in that order.
    # Redundant, because a DVC matrix cannot join 'pretrain' to a list; validated below.
    rows: list[str]
    batch_size: int
    flip: bool
    rerank: bool
    max_rank: int
    ranked_list_queries: int
    # Each ranked-list image gets its map under it (dmf_core/eval/explain.py): where the model looks.
    ranked_list_maps: bool


@dataclass(frozen=True)
class TrackingConfig:
    clearml: Literal["none", "offline", "server"]
    project: str


@dataclass(frozen=True)
class Config:
    seed: int
    datasets: dict[str, DatasetSpec]
    captions: CaptionsConfig
    pack: PackConfig
    model: ModelConfig
    fusion: FusionConfig
    loss: LossConfig
    augment: AugmentConfig
    train: TrainConfig
    pretrain: PretrainConfig
    finetune: FinetuneConfig
    evaluate: EvaluateConfig
    tracking: TrackingConfig
    synth: SynthConfig | None

    def dataset(self, name: str) -> DatasetSpec:
        if name not in self.datasets:
            known = ", ".join(sorted(self.datasets))
            raise ConfigError(f"datasets.{name}: not configured (configured: {known})")
        return self.datasets[name]


# ---------------------------------------------------------------------------------------------
# Conversion with precise errors
# ---------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"a list of {_type_name(item)}"
    if origin is dict:
        return f"a mapping of {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return _convert(value, arg, key)  # a section given: its own error names the key inside
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(v, item, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {key}")


def _build(cls: Any, data: Any, prefix: str) -> Any:
    where = prefix or "params"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{name}: unknown key (allowed here: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            has_default = (
                f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            )
            if not has_default:
                raise ConfigError(f"{key}: missing (expected {_type_name(hints[name])}; every key "
                                  "must be set, none has a default)")
            continue
        kwargs[name] = _convert(data[name], hints[name], key)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Cross-field checks
# ---------------------------------------------------------------------------------------------


def _check_positive(cfg: Config) -> None:
    positives = {
        "model.image.depth": cfg.model.image.depth,
        "model.image.dim": cfg.model.image.dim,
        "model.image.heads": cfg.model.image.heads,
        "model.image.patch": cfg.model.image.patch,
        "model.image.stride": cfg.model.image.stride,
        "model.image.height": cfg.model.image.height,
        "model.image.width": cfg.model.image.width,
        "model.text.max_length": cfg.model.text.max_length,
        "fusion.dim": cfg.fusion.dim,
        "fusion.layers": cfg.fusion.layers,
        "fusion.heads": cfg.fusion.heads,
        "fusion.mlp_ratio": cfg.fusion.mlp_ratio,
        "captions.per_image": cfg.captions.per_image,
        "train.nproc": cfg.train.nproc,
        "train.threads": cfg.train.threads,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "evaluate.batch_size": cfg.evaluate.batch_size,
        "evaluate.max_rank": cfg.evaluate.max_rank,
        "evaluate.ranked_list_queries": cfg.evaluate.ranked_list_queries,
        "fusion.align_temperature": cfg.fusion.align_temperature,
        "fusion.teacher_temperature": cfg.fusion.teacher_temperature,
    }
    for stage in ("pretrain", "finetune"):
        st = getattr(cfg, stage)
        for name in ("epochs", "P", "K", "lr", "accumulate"):
            positives[f"{stage}.{name}"] = getattr(st, name)
    for key, value in positives.items():
        if value <= 0:
            raise ConfigError(f"{key}: expected a positive value, got {value!r}")
    non_negative = {
        "train.num_workers": cfg.train.num_workers,
        "pretrain.warmup_epochs": cfg.pretrain.warmup_epochs,
        "finetune.warmup_epochs": cfg.finetune.warmup_epochs,
        "pretrain.weight_decay": cfg.pretrain.weight_decay,
        "finetune.weight_decay": cfg.finetune.weight_decay,
        "fusion.align_weight": cfg.fusion.align_weight,
        "loss.attribute_weight": cfg.loss.attribute_weight,
        "fusion.teacher_weight": cfg.fusion.teacher_weight,
        "pretrain.holdout_ids": cfg.pretrain.holdout_ids,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: expected a value >= 0, got {value!r}")
    for key, value in {
        "fusion.dropout": cfg.fusion.dropout,
        "fusion.drop_path": cfg.fusion.drop_path,
        "model.image.drop_path": cfg.model.image.drop_path,
        "loss.label_smoothing": cfg.loss.label_smoothing,
        "pretrain.ema": cfg.pretrain.ema,
        "finetune.ema": cfg.finetune.ema,
    }.items():
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key}: expected a rate in [0, 1), got {value!r}")
    if not 0.0 <= cfg.loss.caption_id_share <= 0.5:
        raise ConfigError(f"loss.caption_id_share: expected a share in [0, 0.5] (the images keep at least "
                          f"half of the ID loss), got {cfg.loss.caption_id_share!r}")
    for key, value in {"augment.flip": cfg.augment.flip, "augment.erasing": cfg.augment.erasing}.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}: expected a probability in [0, 1], got {value!r}")


def _check_sizes_and_weights(cfg: Config) -> None:
    """Sizes of the generator, augmentation and loss settings that would only fail much later."""
    if cfg.synth is not None:
        s = cfg.synth
        sizes = {"synth.height": s.height, "synth.width": s.width,
                 "synth.synthped.ids": s.synthped.ids, "synth.synthped.images_per_id": s.synthped.images_per_id}
        for name in ("sp_market", "sp_cuhk", "sp_msmt"):
            d = getattr(s, name)
            if d is not None:
                sizes[f"synth.{name}.train_ids"] = d.train_ids
                sizes[f"synth.{name}.test_ids"] = d.test_ids
        for key, value in sizes.items():
            if value <= 0:
                raise ConfigError(f"{key}: expected a positive value, got {value!r}")
    non_negative = {"augment.pad": cfg.augment.pad, "loss.id_weight": cfg.loss.id_weight,
                    "loss.triplet_weight": cfg.loss.triplet_weight,
                    "pretrain.grad_clip": cfg.pretrain.grad_clip or 0.0,
                    "finetune.grad_clip": cfg.finetune.grad_clip or 0.0,
                    "loss.triplet_margin": cfg.loss.triplet_margin or 0.0}
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: expected a value >= 0, got {value!r}")
    if len(cfg.augment.std) != 3 or min(cfg.augment.std) <= 0:
        raise ConfigError(f"augment.std: expected three positive numbers, got {cfg.augment.std!r}")
    if len(cfg.augment.mean) != 3:
        raise ConfigError(f"augment.mean: expected three numbers, got {cfg.augment.mean!r}")


def _check_targets(cfg: Config) -> None:
    """Refuse a training-only dataset as an evaluation target (CUHK-SYSU: no query/gallery, one camera)."""
    for i, name in enumerate(cfg.evaluate.targets):
        if cfg.datasets[name].layout == "cuhksysu":
            raise ConfigError(f"evaluate.targets[{i}]: {name!r} (layout cuhksysu) is a training source only: it "
                              "has no query/gallery and one camera id, so no evaluation is possible; remove it")


def _check_finetune_rows(cfg: Config) -> None:
    """Each fine-tuning row names configured datasets once each; no two rows train on the same
    set; balanced sampling splits P evenly over a row's parts; the splits are a protocol's."""
    seen: dict[frozenset, str] = {}
    for i, row in enumerate(cfg.finetune.sources):
        problem = row_problem(row, cfg.datasets)
        if problem:
            raise ConfigError(f"finetune.sources[{i}]: {problem}")
        parts = row_parts(row)
        if frozenset(parts) in seen:
            raise ConfigError(f"finetune.sources[{i}]: {row!r} trains on the same datasets as "
                              f"{seen[frozenset(parts)]!r}")
        seen[frozenset(parts)] = row
        if cfg.finetune.sampler == "balanced" and cfg.finetune.P % len(parts):
            raise ConfigError(f"finetune.P: {cfg.finetune.P} identities per batch cannot be split evenly over "
                              f"the {len(parts)} datasets of {row!r} (finetune.sampler: balanced)")
    if sorted(cfg.finetune.splits) not in (["train"], ["gallery", "query", "train"]):
        raise ConfigError(f"finetune.splits: expected [train] (Protocol-2) or [train, query, gallery] "
                          f"(Protocol-3), got {cfg.finetune.splits}")


def _check_consistency(cfg: Config) -> None:
    _check_positive(cfg)
    _check_sizes_and_weights(cfg)
    if cfg.fusion.dim % cfg.fusion.heads:
        raise ConfigError(
            f"fusion.dim: {cfg.fusion.dim} is not divisible by fusion.heads={cfg.fusion.heads}"
        )
    img = cfg.model.image
    if img.dim % img.heads:
        raise ConfigError(f"model.image.dim: {img.dim} is not divisible by model.image.heads={img.heads}")
    if img.height < img.patch or img.width < img.patch:
        raise ConfigError(
            f"model.image.height/width: {img.height}x{img.width} is smaller than one patch ({img.patch})"
        )
    if cfg.pack.resize is not None and (len(cfg.pack.resize) != 2 or min(cfg.pack.resize) <= 0):
        raise ConfigError(f"pack.resize: expected null or [height, width] > 0, got {cfg.pack.resize!r}")
    names = [cfg.pretrain.dataset, cfg.captions.dataset, *cfg.evaluate.targets]
    for where, name in zip(
        ["pretrain.dataset", "captions.dataset"]
        + [f"evaluate.targets[{i}]" for i in range(len(cfg.evaluate.targets))],
        names,
    ):
        if name not in cfg.datasets:
            raise ConfigError(f"{where}: dataset {name!r} is not listed under datasets")
    _check_targets(cfg)
    _check_finetune_rows(cfg)
    rows = ["pretrain", *cfg.finetune.sources]
    if cfg.evaluate.rows != rows:
        raise ConfigError(f"evaluate.rows: expected {rows} ('pretrain', then finetune.sources in order: the "
                          f"stages evaluate@<row>-<target>), got {cfg.evaluate.rows}")
    for name, spec in cfg.datasets.items():
        if spec.source == "synth" and spec.layout == "csv":
            raise ConfigError(f"datasets.{name}: layout csv is a folder of your own images (source: dir, "
                              "location: the folder holding dataset.csv), not generated")
        if spec.source == "synth":
            if cfg.synth is None:
                raise ConfigError(f"datasets.{name}: source 'synth' needs a synth: section")
            if spec.layout == "finegpr":
                if name != "synthped":
                    raise ConfigError(f"datasets.{name}: the synthetic FineGPR-format set is 'synthped'")
            else:
                cfg.synth.domain(name)
        elif not spec.location:
            raise ConfigError(f"datasets.{name}.location: source {spec.source!r} needs a location")
    for key, (lo, hi) in cfg.captions.viewpoint_words.items():
        if not (0 <= lo < 360 and 0 <= hi <= 360):
            raise ConfigError(f"captions.viewpoint_words.{key}: angles must lie in [0, 360]")


def _check_finite(value: Any, key: str) -> None:
    """Refuse NaN and infinities anywhere (YAML ``.nan``, ``.inf``, ``-.inf``).

    Every comparison with NaN is false, so a NaN learning rate or rate would slip through each
    range check below and only show up as a NaN loss hours later; an infinity is never a
    meaningful size, rate or weight either. Runs on the parsed YAML, before the schema, so it
    covers every key, typed float or not.
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key or 'params'}: expected a finite number, got {value!r} "
                          "(NaN and infinities are refused)")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(k, f"{key}.{k}" if key else str(k))
            _check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_dir_sources(cfg: Config, root: Path) -> None:
    """Refuse a ``source: dir`` folder inside (or containing) ``data/raw/``.

    ``data/raw/<name>/`` is the download stage's output: ``dvc repro`` deletes it before the
    stage runs, so a dataset kept there (or reached there through a symlink or ``..``) would be
    lost, and a folder that contains ``data/raw/`` would be linked into itself. Paths are
    resolved (symlinks followed) against ``root``, the project root stages run in.
    """
    raw = (root / RAW).resolve()
    for name, spec in cfg.datasets.items():
        if spec.source != "dir" or not spec.location:
            continue
        where = (root / spec.location).resolve()
        if _inside(where, raw):
            problem = f"resolves to {where}, inside {RAW}/ ({raw})"
        elif _inside(raw, where):
            problem = f"resolves to {where}, which contains {RAW}/ ({raw})"
        else:
            continue
        raise ConfigError(
            f"datasets.{name}.location: {spec.location!r} {problem}. {RAW}/<name>/ is the download "
            f"stage's output and DVC deletes it before the stage runs, so the data would be lost. "
            f"Move the extracted folder elsewhere, e.g. data/extracted/{name}/, data/archives/{name}/ "
            f"or outside the project, and point datasets.{name}.location there")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def config_from_dict(data: Any, *, root: str | Path | None = None) -> Config:
    """Build and validate a :class:`Config` from an already parsed mapping.

    ``root`` is the project root relative dataset locations are resolved against: the
    current directory by default, the DVC working directory every stage runs in.
    """
    _check_finite(data, "")
    cfg = _build(Config, data, "")
    _check_consistency(cfg)
    _check_dir_sources(cfg, Path.cwd() if root is None else Path(root))
    return cfg


def load_config(path: str | Path = "params.yaml", *, root: str | Path | None = None) -> Config:
    """Read ``path`` (YAML) and return the validated configuration or raise ConfigError.

    ``root``: see :func:`config_from_dict`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of parameters, got {type(data).__name__}")
    try:
        return config_from_dict(data, root=root)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def to_dict(cfg: Any) -> Any:
    """Plain-dict view of a config (for checkpoint metadata and tracking)."""
    return dataclasses.asdict(cfg)


def expected_lmdb_meta(cfg: Config) -> dict:
    """What readers require of a packed LMDB: built with the pack params this config asks for."""
    return {"resize": cfg.pack.resize}
