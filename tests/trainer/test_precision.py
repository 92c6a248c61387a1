"""Precision resolution: CPU flag detection on /proc/cpuinfo text, and what `auto` becomes."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.precision import cpu_flags, host_cpu_flags, native_bf16, resolve_precision

# Abridged /proc/cpuinfo of three real machines (one core each; the flag names are Linux's).
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
bugs\t\t: spectre_v1
"""
COOPER_LAKE = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8380H
flags\t\t: fpu sse avx avx2 avx512f avx512_vnni avx512_bf16
"""
EPYC_MILAN = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7763
flags\t\t: fpu vme sse sse2 avx f16c avx2 bmi2 vaes vpclmulqdq
"""
SKYLAKE_AVX512_NO_BF16 = "flags\t: fpu avx2 avx512f avx512bw avx512_vnni\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_cpu_flags_reads_the_first_flags_line() -> None:
    flags = cpu_flags(SAPPHIRE_RAPIDS)
    assert {"amx_bf16", "avx512_bf16", "avx2"} <= flags and "spectre_v1" not in flags
    assert cpu_flags(GRAVITON3) == {"fp", "asimd", "sve", "bf16", "i8mm"}
    assert cpu_flags("") == frozenset() and cpu_flags("processor: 0\n") == frozenset()


@pytest.mark.parametrize(
    ("cpuinfo", "native"),
    [(SAPPHIRE_RAPIDS, True), (COOPER_LAKE, True), (EPYC_MILAN, False), (SKYLAKE_AVX512_NO_BF16, False)],
)
def test_native_bf16_needs_amx_or_avx512_bf16(cpuinfo: str, native: bool) -> None:
    assert native_bf16(cpu_flags(cpuinfo)) is native


def test_auto_is_bf16_on_cuda_and_on_cpus_with_native_bf16_else_fp32() -> None:
    assert resolve_precision("auto", cuda=False, flags=cpu_flags(SAPPHIRE_RAPIDS)) == "bf16"
    assert resolve_precision("auto", cuda=False, flags=cpu_flags(COOPER_LAKE)) == "bf16"
    assert resolve_precision("auto", cuda=False, flags=cpu_flags(EPYC_MILAN)) == "fp32"  # emulated bf16 is slower
    assert resolve_precision("auto", cuda=False, flags=frozenset()) == "fp32"  # unknown CPU
    # bf16 backward on a CPU is not bitwise reproducible: a deterministic run trains in fp32.
    assert resolve_precision("auto", cuda=False, flags=cpu_flags(SAPPHIRE_RAPIDS), deterministic=True) == "fp32"
    assert resolve_precision("bf16", cuda=False, flags=cpu_flags(SAPPHIRE_RAPIDS), deterministic=True) == "bf16"
    assert resolve_precision("auto", cuda=True, flags=cpu_flags(EPYC_MILAN)) == "bf16"
    # Explicit choices are honoured whatever the hardware.
    assert resolve_precision("bf16", cuda=False, flags=cpu_flags(EPYC_MILAN)) == "bf16"
    assert resolve_precision("fp32", cuda=True, flags=cpu_flags(SAPPHIRE_RAPIDS)) == "fp32"
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        resolve_precision("fp16", cuda=False, flags=frozenset())


def test_host_flags_from_a_file_and_a_missing_one(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text(COOPER_LAKE)
    assert native_bf16(host_cpu_flags(tmp_path / "cpuinfo"))
    assert host_cpu_flags(tmp_path / "absent") == frozenset()
