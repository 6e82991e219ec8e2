"""Which arithmetic the model's passes use: float32, or bfloat16 autocast where it pays.

bfloat16 halves the memory traffic of every matmul, but it is only faster where the
hardware has bf16 units: CPUs with AVX512_BF16 or AMX, and most GPUs. Elsewhere (an AVX2
CPU) bf16 is emulated and far slower than float32. :func:`resolve_precision` turns a user's
``"auto"``, ``"fp32"`` or ``"bf16"`` into one of the two: ``"auto"`` picks bf16 only where
the hardware has native units *and* a short probe measures a bf16 matmul at least
:data:`AUTO_SPEEDUP` times as fast as a float32 one (native units that the library's
kernels do not use would still lose).

What stays in higher precision whatever is chosen (solves, statistics sums, the SPHERE
projection) is the caller's business; this module only says which precision to use.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

Precision = Literal["fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")
# bf16 changes the edits (within rounding), so auto only takes it for a clear gain.
AUTO_SPEEDUP = 2.0
# CPU flags (as /proc/cpuinfo spells them) that mean bf16 matmuls run on real units.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


class PrecisionError(ValueError):
    """A precision name that is not one of :data:`PRECISIONS`."""


@dataclass(frozen=True)
class Bf16Support:
    """What the hardware of one device type offers for bf16.

    - ``native``: bf16 matmuls run on bf16 units (not emulated).
    - ``features``: what says so (CPU flags, or ``"cuda"``), for display.
    - ``fp32_gflops`` / ``bf16_gflops``: the probe's matmul throughput (0 when not probed).
    """

    native: bool
    features: tuple[str, ...]
    fp32_gflops: float = 0.0
    bf16_gflops: float = 0.0

    @property
    def speedup(self) -> float:
        """bf16 matmul throughput over float32's (0 when not probed)."""
        return self.bf16_gflops / self.fp32_gflops if self.fp32_gflops > 0 else 0.0


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (the ``flags`` line of ``/proc/cpuinfo``; empty where there
    is no such file, e.g. not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            flags.update(value.split())
    return flags


def native_bf16_flags(flags: set[str]) -> tuple[str, ...]:
    """The flags among ``flags`` that mean native bf16 matmuls, in a fixed order."""
    return tuple(f for f in BF16_CPU_FLAGS if f in flags)


def matmul_gflops(
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    size: int = 1024,
    seconds: float = 0.25,
) -> float:
    """Best-of-runs throughput of a ``size``² matmul in ``dtype`` on ``device``, in GFLOP/s
    (2·size³ FLOPs a product), repeating for about ``seconds``."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up: the first call may pick and set up kernels
    _sync(device)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    runs = 0
    while runs < 2 or time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
        runs += 1
    return 2 * size**3 / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _native(device: torch.device) -> tuple[bool, tuple[str, ...]]:
    if device.type == "cuda":
        supported = bool(torch.cuda.is_bf16_supported())
        return supported, ("cuda",) if supported else ()
    features = native_bf16_flags(cpu_flags())
    return bool(features), features


@functools.cache
def bf16_support(device_type: str = "cpu", probe: bool = True) -> Bf16Support:
    """Native bf16 on this machine's ``device_type`` (``"cpu"`` or ``"cuda"``) and, with
    ``probe``, the measured fp32 and bf16 matmul throughput (about a second, once per
    process). Without native units the probe is skipped: emulated bf16 is never chosen."""
    device = torch.device(device_type)
    native, features = _native(device)
    if not (native and probe):
        return Bf16Support(native, features)
    fp32 = matmul_gflops(torch.float32, device)
    bf16 = matmul_gflops(torch.bfloat16, device)
    return Bf16Support(native, features, fp32, bf16)


def choose(requested: str, support: Bf16Support) -> Precision:
    """The precision for ``requested`` on hardware ``support`` (see the module doc)."""
    if requested not in PRECISIONS:
        raise PrecisionError(
            f"precision: unknown value {requested!r}; give one of {', '.join(PRECISIONS)}"
        )
    if requested != "auto":
        return requested  # type: ignore[return-value]
    return "bf16" if support.native and support.speedup >= AUTO_SPEEDUP else "fp32"


def resolve_precision(requested: str, device: torch.device | str = "cpu") -> Precision:
    """``"auto"``, ``"fp32"`` or ``"bf16"`` as ``"fp32"`` or ``"bf16"`` for ``device``:
    auto is bf16 where the hardware has native bf16 units and the probe measures a bf16
    matmul at least :data:`AUTO_SPEEDUP` times float32's, else fp32. An explicit choice is
    kept as given (bf16 on hardware without units runs, slowly)."""
    if requested in ("fp32", "bf16"):
        return requested  # type: ignore[return-value]
    if requested != "auto":
        return choose(requested, Bf16Support(False, ()))  # raises, naming the choices
    return choose(requested, bf16_support(torch.device(device).type))


def describe(
    precision: Precision, device: torch.device | str = "cpu", requested: str = "auto"
) -> str:
    """One line for the user: the precision and why, e.g. ``"precision: bf16 (native:
    avx512_bf16 amx_bf16; bf16 matmul 5.2x fp32)"``. The probe's ratio is shown where
    ``requested`` was auto or bf16 was chosen (an explicit fp32 runs no probe)."""
    probe = requested == "auto" or precision == "bf16"
    support = bf16_support(torch.device(device).type, probe=probe)
    native = "native: " + " ".join(support.features) if support.native else "no native bf16"
    if support.speedup > 0:
        native += f"; bf16 matmul {support.speedup:.1f}x fp32"
    return f"precision: {precision} ({native})"
