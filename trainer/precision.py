"""The arithmetic a run trains in, resolved once when the run starts.

`precision: auto` means bf16 autocast where the hardware computes bf16 natively: CUDA, and
CPUs with AMX (`amx_bf16`) or AVX-512 BF16 (`avx512_bf16`). Elsewhere it means fp32: oneDNN
emulates bf16 on a CPU without those units, and the emulation is far slower than fp32
(ResNet-18 at 32 px on an AVX2-only EPYC, one thread: 145 images/s fp32, 2.6 bf16, 19 bf16
with channels-last; docs/benchmarks.md). `fp32` and `bf16` are honoured as given.

A run that asks to be `deterministic` resolves `auto` to fp32 on a CPU: oneDNN's bf16
convolution backward pass (weights) is not bitwise reproducible there, even on one thread
(measured on an AVX512_BF16 EPYC: the same batch twice, 5% of one layer's weight-gradient
elements differ by up to 3 bf16 ulps), so a bf16 run cannot be replayed bit for bit.

The resolved value replaces `auto` in the run's config, so the run directory's config.json,
the checkpoint, the job's progress and the model card all say what the run trained in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

ResolvedPrecision = Literal["fp32", "bf16"]
# /proc/cpuinfo flags of units that execute bf16 arithmetic (Linux names them so on x86).
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags in /proc/cpuinfo text: the first `flags` line (x86) or `Features`
    line (ARM); every core lists the same ones."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def host_cpu_flags(path: Path = CPUINFO) -> frozenset[str]:
    """This machine's CPU flags; empty where /proc/cpuinfo is unreadable (not Linux)."""
    try:
        return cpu_flags(path.read_text())
    except OSError:
        return frozenset()


def native_bf16(flags: frozenset[str]) -> bool:
    """Whether a CPU with `flags` computes bf16 in hardware (AMX or AVX-512 BF16)."""
    return not NATIVE_BF16_FLAGS.isdisjoint(flags)


def resolve_precision(
    requested: str, cuda: bool, flags: frozenset[str] | None = None, deterministic: bool = False
) -> ResolvedPrecision:
    """`requested` ("auto", "fp32" or "bf16") as the run will execute it; `flags` defaults to
    this machine's CPU flags (read only when needed)."""
    if requested in ("fp32", "bf16"):
        return requested  # type: ignore[return-value]
    if requested != "auto":
        raise ValueError(f"precision must be auto, fp32 or bf16, not {requested!r}")
    if cuda:
        return "bf16"
    if deterministic:
        return "fp32"
    return "bf16" if native_bf16(host_cpu_flags() if flags is None else flags) else "fp32"
