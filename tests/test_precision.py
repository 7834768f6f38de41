"""train.precision: native-bf16 detection from /proc/cpuinfo (run facts) and the auto decision."""

from __future__ import annotations

import pytest
import torch

from dmf_core.train import precision

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 avx2 avx512f {extra}
bogomips\t: 4000.00

processor\t: 1
flags\t\t: fpu vme sse sse2 avx2 avx512f {extra}
"""


@pytest.fixture
def cpuinfo(monkeypatch, tmp_path):
    """Point the reader at a fake /proc/cpuinfo holding ``extra`` flags (None: no file at all)."""
    def use(extra: str | None):
        path = tmp_path / "cpuinfo"
        if extra is not None:
            path.write_text(CPUINFO.format(extra=extra))
        monkeypatch.setattr(precision, "CPUINFO", path)
    return use


@pytest.mark.parametrize("extra,found", [
    ("avx512_bf16 avx512_vnni", ["avx512_bf16"]),
    ("amx_bf16 amx_tile", ["amx_bf16"]),
    ("avx512_bf16 amx_bf16", ["avx512_bf16", "amx_bf16"]),
    ("avx512_vnni avx512_fp16", []),   # neighbours of the flags do not count
])
def test_native_bf16_from_the_cpu_flags(cpuinfo, extra, found):
    cpuinfo(extra)
    assert precision.cpu_bf16_flags() == found
    # auto stays fp32 on every CPU, native bf16 or not: bf16 there is opt-in
    assert precision.resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_unknown_cpu_is_not_native(cpuinfo, monkeypatch, tmp_path):
    cpuinfo(None)  # no /proc/cpuinfo (macOS, Windows, a sandbox)
    assert precision.read_cpu_flags() is None
    assert precision.cpu_bf16_flags() == []
    (tmp_path / "no_flags").write_text("processor\t: 0\nvendor_id\t: ARM\n")
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "no_flags")
    assert precision.read_cpu_flags() is None  # a file without a flags line
    assert precision.cpu_bf16_flags() == []


def test_explicit_settings_win_and_cuda_auto_is_bf16(cpuinfo):
    cpuinfo("avx512_vnni")
    assert precision.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    cpuinfo("amx_bf16")
    assert precision.resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert precision.resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert precision.resolve_precision("auto", torch.device("meta")) == "fp32"
    with pytest.raises(ValueError, match="train.precision: expected one of .* got 'fp16'"):
        precision.resolve_precision("fp16", torch.device("cpu"))
