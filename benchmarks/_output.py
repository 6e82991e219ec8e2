"""What the benchmark scripts share: where the data folder is, what the machine is (its
bf16 flags and matmul peaks, measured the same way by every script), and how the speed
benchmarks print and keep their result (one aligned line per field, and the same dict as
JSON with ``--out``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sphere_edit.common.precision import bf16_support, cpu_flags, matmul_gflops
from sphere_edit.evaluation.data import DataSourceError, data_root

DATA_HELP = "data folder with counterfact/ and corpus/ (default: $SPHERE_EDIT_DATA)"


def data_folder(value: Path | None) -> Path:
    """``--data`` when given, else ``$SPHERE_EDIT_DATA`` (:func:`data_root`); exits with
    its one-line message when neither is set."""
    try:
        return data_root(value)
    except DataSourceError as error:
        raise SystemExit(f"error: {error}") from None


def print_and_save(result: dict[str, Any], out: Path | None, float_format: str = ".6g") -> None:
    """Print ``result`` one field a line and, with ``out``, write it there as JSON."""
    for key, value in result.items():
        shown = format(value, float_format) if isinstance(value, float) else value
        print(f"{key:>28}: {shown}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))


def machine_facts(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The CPU's bf16 and AMX flags, whether bf16 is native, and the fp32 and bf16 matmul
    peaks of ``device`` in GFLOP/s (best over about a second of square products: 2048² on
    a CPU, 8192² on a GPU, which needs large products to reach its peak). Emulated bf16
    (AVX2-only CPUs, hundreds of times slower) is probed at 512², which shows it in
    seconds rather than minutes."""
    device = torch.device(device)
    native = device.type == "cuda" or bf16_support("cpu", probe=False).native
    size = 8192 if device.type == "cuda" else 2048
    peaks = {
        "fp32": matmul_gflops(torch.float32, device, size=size, seconds=1.0),
        "bf16": matmul_gflops(torch.bfloat16, device, size=size if native else 512, seconds=1.0),
    }
    return {
        "cpu_bf16_flags": sorted(f for f in cpu_flags() if "bf16" in f or f.startswith("amx")),
        "native_bf16": native,
        "matmul_peak_gflops": peaks,
    }
