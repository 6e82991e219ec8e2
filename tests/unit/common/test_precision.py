"""Choosing fp32 or bf16: flag parsing, the auto rule, the probe, the one-line errors."""

from __future__ import annotations

import pytest
import torch

from sphere_edit.common import precision
from sphere_edit.common.precision import (
    Bf16Support,
    PrecisionError,
    choose,
    cpu_flags,
    matmul_gflops,
    native_bf16_flags,
    resolve_precision,
)

CPUINFO = """processor\t: 0
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16
processor\t: 1
flags\t\t: fpu sse2 avx2
"""


def test_cpu_flags_reads_every_flags_line(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    flags = cpu_flags(path)
    assert {"avx512_bf16", "amx_bf16", "avx2", "fpu"} <= flags
    assert "processor" not in flags and "0" not in flags


def test_cpu_flags_of_a_missing_file_is_empty(tmp_path):
    assert cpu_flags(tmp_path / "absent") == set()


def test_native_flags_are_the_bf16_ones_in_fixed_order():
    assert native_bf16_flags({"amx_bf16", "avx2", "avx512_bf16"}) == ("avx512_bf16", "amx_bf16")
    assert native_bf16_flags({"avx2", "fma", "avx512f"}) == ()


@pytest.mark.parametrize(
    ("support", "expected"),
    [
        (Bf16Support(True, ("amx_bf16",), 100.0, 500.0), "bf16"),
        (Bf16Support(True, ("amx_bf16",), 100.0, 200.0), "bf16"),  # exactly 2x
        (Bf16Support(True, ("amx_bf16",), 100.0, 199.0), "fp32"),  # units, too little gain
        (Bf16Support(False, (), 100.0, 1.4), "fp32"),  # emulated
        (Bf16Support(False, ()), "fp32"),  # not probed
    ],
)
def test_auto_takes_bf16_only_when_native_and_twice_as_fast(support, expected):
    assert choose("auto", support) == expected


def test_explicit_choices_are_kept_whatever_the_hardware():
    slow = Bf16Support(False, (), 100.0, 1.0)
    assert choose("bf16", slow) == "bf16"
    assert choose("fp32", Bf16Support(True, ("amx_bf16",), 1.0, 100.0)) == "fp32"
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("bf16") == "bf16"


def test_an_unknown_precision_is_a_one_line_error_naming_the_choices():
    with pytest.raises(PrecisionError, match=r"^precision: .*'fp16'.*auto, fp32, bf16$"):
        resolve_precision("fp16")
    assert issubclass(PrecisionError, ValueError)


def test_resolve_auto_follows_the_probe(monkeypatch):
    calls = []

    def fake(device_type: str = "cpu", probe: bool = True) -> Bf16Support:
        calls.append((device_type, probe))
        return Bf16Support(True, ("avx512_bf16",), 50.0, 400.0)

    monkeypatch.setattr(precision, "bf16_support", fake)
    assert resolve_precision("auto", "cpu") == "bf16"
    assert calls == [("cpu", True)]
    line = precision.describe("bf16", "cpu")
    assert line == "precision: bf16 (native: avx512_bf16; bf16 matmul 8.0x fp32)"


def test_without_native_units_the_probe_is_skipped(monkeypatch):
    monkeypatch.setattr(precision, "_native", lambda device: (False, ()))
    probed = []
    monkeypatch.setattr(precision, "matmul_gflops", lambda *a, **k: probed.append(a) or 1.0)
    support = precision.bf16_support.__wrapped__("cpu")
    assert support == Bf16Support(False, ())
    assert probed == []
    assert precision.describe("fp32", "cpu", requested="fp32") == "precision: fp32 (no native bf16)"


def test_support_is_probed_once_per_process():
    first = precision.bf16_support("cpu")
    assert precision.bf16_support("cpu") is first


def test_matmul_gflops_counts_two_flops_per_multiply_add(monkeypatch):
    # A clock that advances one second per reading: every product "takes" 1 s.
    ticks = iter(range(1000))
    monkeypatch.setattr(precision.time, "perf_counter", lambda: float(next(ticks)))
    assert matmul_gflops(torch.float32, size=10, seconds=0.0) == pytest.approx(2 * 10**3 / 1e9)


@pytest.mark.parametrize("command", ["edit", "demo"])
def test_the_cli_refuses_an_unknown_precision_in_one_line_before_loading(tmp_path, command):
    from typer.testing import CliRunner

    from sphere_edit.cli.app import app

    args = [command, "--precision", "fp16", "--model", str(tmp_path / "no-such-model")]
    if command == "edit":
        args += ["--requests", str(tmp_path / "r.json"), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: --precision: unknown value 'fp16'; give one of auto, fp32, bf16"]
