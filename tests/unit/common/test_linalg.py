"""Solves on the model's device: float32 factorisation with float64 iterative refinement
against a float64 solve, and the CPU path unchanged."""

from __future__ import annotations

import warnings

import pytest
import torch

from sphere_edit.common import linalg
from sphere_edit.common.linalg import (
    IllConditionedWarning,
    refined_or_direct,
    refined_solve,
    solve,
    solve_on,
)


def _system(size: int, condition: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric positive definite matrix with the given condition number (as C0-based
    systems are), and a right-hand side of 7 columns."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=g, dtype=torch.float64))
    values = torch.logspace(0, torch.log10(torch.tensor(condition)).item(), size).double()
    return (q * values) @ q.T, torch.randn(size, 7, generator=g, dtype=torch.float64)


def _residual(a: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> float:
    return float((b - a @ x).norm())


def test_refinement_reaches_the_float64_residual_where_float32_alone_does_not():
    a, b = _system(300, 1e5)
    direct = torch.linalg.solve(a, b)
    plain = torch.linalg.solve(a.float(), b.float()).double()
    refined, corrections = refined_solve(a, b)
    assert corrections >= 1
    assert _residual(a, refined, b) <= 10 * _residual(a, direct, b)
    assert _residual(a, plain, b) >= 100 * _residual(a, direct, b)  # the test can fail
    torch.testing.assert_close(refined, direct, rtol=1e-9, atol=1e-12)


def test_a_system_too_ill_conditioned_for_float32_falls_back_to_float64():
    a, b = _system(200, 1e12)
    direct = solve(a, b)
    x = refined_or_direct(a, b, what="test", direct=False)
    assert _residual(a, x, b) <= 10 * _residual(a, direct, b)


def test_direct_and_cpu_paths_are_the_float64_solve_bitwise():
    a, b = _system(64, 1e3)
    expected = solve(a, b)
    assert torch.equal(refined_or_direct(a, b, what="test", direct=True), expected)
    assert torch.equal(solve_on(torch.device("cpu"), a, b), expected)
    assert torch.equal(solve_on(None, a, b[:, 0]), solve(a, b[:, 0]))


def test_a_singular_system_still_warns_and_solves_by_least_squares():
    a, b = _system(32, 10.0)
    a[:, -1] = a[:, 0]
    a[-1, :] = a[0, :]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = refined_or_direct(a, b, what="singular test", direct=False)
    assert any(issubclass(w.category, IllConditionedWarning) for w in caught)
    assert bool(torch.isfinite(x).all())


def test_float64_speed_is_probed_once_per_device(monkeypatch):
    calls: list[torch.dtype] = []

    def fake(dtype, device, **_):
        calls.append(dtype)
        return 1.0 if dtype == torch.float64 else 64.0  # a consumer GPU's 1/64

    monkeypatch.setattr("sphere_edit.common.precision.matmul_gflops", fake)
    monkeypatch.setattr(linalg, "_FLOAT64_FAST", {})
    device = torch.device("cuda", 3)
    assert linalg.float64_is_fast(torch.device("cpu"))
    assert not linalg.float64_is_fast(device)
    assert not linalg.float64_is_fast(device)
    assert calls == [torch.float64, torch.float32]


@pytest.mark.parametrize("size", [1, 5])
def test_small_and_vector_systems(size):
    a, b = _system(size, 2.0)
    x = refined_or_direct(a, b[:, 0], what="test", direct=False)
    torch.testing.assert_close(x, torch.linalg.solve(a, b[:, 0]), rtol=1e-10, atol=1e-12)
