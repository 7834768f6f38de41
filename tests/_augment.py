"""The augmentation settings the loader tests pass where the pipeline passes AugmentConfig."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Aug:  # the fields of dmf_core.config.AugmentConfig
    flip: float = 0.5
    pad: int = 4
    erasing: float = 0.5
    mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
