"""Which autocast precision a run uses (``train.precision``), and what the CPU could do.

``auto`` is bf16 on CUDA and fp32 everywhere else, a CPU with native bf16 included: bf16 on a CPU
(AVX512_BF16 or AMX-BF16) is faster but moved the demo's results by -38 to +10 mAP over three
paired seeds (README, docs/training.md), so it stays opt-in until its accuracy holds. The run facts
record the CPU's native-bf16 flags (:func:`cpu_bf16_flags`, read from ``/proc/cpuinfo`` on
Linux; none where they cannot be read), so a result says which kernels made it.
"""

from __future__ import annotations

from pathlib import Path

import torch

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


def resolve_precision(setting: str, device: torch.device | str) -> str:
    """``'bf16'`` or ``'fp32'`` for ``train.precision`` on ``device``: an explicit setting as
    given; ``'auto'``: bf16 on CUDA, fp32 elsewhere."""
    if setting not in SETTINGS:
        raise ValueError(f"train.precision: expected one of {SETTINGS}, got {setting!r}")
    if setting != "auto":
        return setting
    return "bf16" if torch.device(device).type == "cuda" else "fp32"
