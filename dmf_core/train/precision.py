"""Which autocast precision a run uses: ``train.precision: auto`` -> bf16 where the hardware has it.

On CUDA, ``auto`` is bf16 (as the training loop does today). On a CPU, bf16 autocast only pays with native
bf16 arithmetic (the AVX512_BF16 or AMX-BF16 instructions); without them PyTorch emulates it and
is slower than fp32, so ``auto`` is fp32 there. The CPU's flags come from ``/proc/cpuinfo``
(Linux); where they cannot be read the answer is "no native bf16", so nothing is guessed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
SETTINGS = ("auto", "bf16", "fp32")


def read_cpu_flags() -> set[str] | None:
    """The ``flags`` of the first processor in /proc/cpuinfo, or None where there is none to read."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def cpu_bf16_flags() -> list[str]:
    """Which of the native-bf16 flags the CPU reports (empty where unknown)."""
    flags = read_cpu_flags() or set()
    return [f for f in BF16_FLAGS if f in flags]


def cpu_has_native_bf16() -> bool:
    """True when the CPU reports AVX512_BF16 or AMX-BF16; False without them or where unknown."""
    return bool(cpu_bf16_flags())


def resolve_precision(setting: str, device: torch.device) -> str:
    """``'bf16'`` or ``'fp32'`` for ``train.precision`` on ``device``: an explicit setting as given,
    ``'auto'`` from the hardware (CUDA: bf16; CPU: bf16 with native bf16; anything else: fp32)."""
    if setting not in SETTINGS:
        raise ValueError(f"train.precision: expected one of {SETTINGS}, got {setting!r}")
    if setting != "auto":
        return setting
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def precision_facts(setting: str = "auto", device: torch.device | str = "cpu") -> dict:
    """What the run facts record about the choice: the setting, the device, the CPU's native-bf16
    flags (None where /proc/cpuinfo could not be read) and the decision."""
    device = torch.device(device)
    flags = read_cpu_flags()
    return {"setting": setting, "device": device.type,
            "cpu_bf16_flags": None if flags is None else [f for f in BF16_FLAGS if f in flags],
            "precision": resolve_precision(setting, device)}
