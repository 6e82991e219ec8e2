"""Hyperspherical energy against its definition, computed with plain Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from sphere_edit.sphere.energy import coincident_pairs, hyperspherical_energy, unit_neurons


def _naive(weight: torch.Tensor, s: float) -> float:
    rows = [[float(x) for x in row] for row in weight.double()]
    units = []
    for row in rows:
        norm = math.sqrt(sum(x * x for x in row))
        units.append([x / norm for x in row])
    n = len(units)
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            dist = math.sqrt(sum((a - b) ** 2 for a, b in zip(units[i], units[j], strict=True)))
            total += math.log(1.0 / dist) if s == 0 else dist ** (-s)
    return total if s == 0 else total / (n * (n - 1))


def _weight(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("s", [0.0, 0.5, 1.0, 2.0, 3.5])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
def test_energy_equals_naive_double_loop(s, chunk_size):
    weight = _weight(11, 6, seed=int(10 * s))
    got = hyperspherical_energy(weight, s, chunk_size=chunk_size)
    assert got == pytest.approx(_naive(weight, s), rel=1e-10, abs=1e-12)


def test_log_energy_is_the_unnormalised_sum():
    """s = 0 sums log(1/dist) over all ordered pairs, without dividing by N(N-1)."""
    weight = _weight(6, 5, seed=1)
    units = weight / weight.norm(dim=1, keepdim=True)
    dist = torch.cdist(units, units)
    off = ~torch.eye(6, dtype=torch.bool)
    expected = float(torch.log(1.0 / dist[off]).sum())
    assert hyperspherical_energy(weight, 0.0) == pytest.approx(expected, rel=1e-10)


def test_energy_of_float32_weight():
    weight = _weight(9, 4, seed=3).float()
    assert hyperspherical_energy(weight, 1.0, chunk_size=2) == pytest.approx(
        _naive(weight, 1.0), rel=1e-10
    )


def test_in_out_layout_equals_transposed_out_in():
    weight = _weight(8, 13, seed=4)  # 8 neurons of dimension 13, (out, in)
    for s in (0.0, 1.0, 2.0):
        expected = hyperspherical_energy(weight, s)
        assert hyperspherical_energy(weight.T.contiguous(), s, layout="in_out") == pytest.approx(
            expected, rel=1e-12
        )
    # Not the same as reading the stored matrix the other way round.
    assert hyperspherical_energy(weight.T, 1.0) != pytest.approx(
        hyperspherical_energy(weight, 1.0), rel=1e-3
    )
    with pytest.raises(ValueError, match="layout"):
        hyperspherical_energy(weight, layout="rows")


def test_energy_ignores_row_scale():
    weight = _weight(10, 5, seed=5)
    scaled = weight * torch.linspace(0.01, 100.0, 10, dtype=torch.float64)[:, None]
    assert hyperspherical_energy(scaled, 1.0) == pytest.approx(
        hyperspherical_energy(weight, 1.0), rel=1e-12
    )


def test_regular_simplex_has_the_known_energy():
    """d + 1 neurons forming a regular simplex: every distance is sqrt(2 + 2/d)."""
    d = 4
    vertices = torch.eye(d + 1, dtype=torch.float64) - 1.0 / (d + 1)
    dist = math.sqrt(2 + 2 / d)
    assert hyperspherical_energy(vertices, 1.0) == pytest.approx(1 / dist, rel=1e-12)
    n = d + 1
    assert hyperspherical_energy(vertices, 0.0) == pytest.approx(
        n * (n - 1) * math.log(1 / dist), rel=1e-12
    )


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 1024])
def test_coincident_neurons_give_inf_and_are_counted(chunk_size):
    weight = _weight(7, 5, seed=6)
    weight[4] = weight[1] * 3.0  # same direction, different length
    weight[6] = weight[1]
    weight[5] = weight[2]
    for s in (0.0, 1.0, 2.0):
        assert hyperspherical_energy(weight, s, chunk_size=chunk_size) == math.inf
    # {1, 4, 6} gives 6 ordered pairs, {2, 5} gives 2.
    assert coincident_pairs(weight, chunk_size=chunk_size) == 8
    assert coincident_pairs(weight.T, layout="in_out", chunk_size=chunk_size) == 8


def test_no_coincident_pairs_and_antipodal_neurons_are_not_coincident():
    weight = _weight(6, 4, seed=7)
    assert coincident_pairs(weight) == 0
    weight[3] = -weight[0]
    assert coincident_pairs(weight) == 0
    assert math.isfinite(hyperspherical_energy(weight, 1.0))


def test_zero_neuron_raises():
    weight = _weight(5, 4, seed=8)
    weight[2] = 0.0
    with pytest.raises(ValueError, match="row 2"):
        hyperspherical_energy(weight)
    with pytest.raises(ValueError, match="zero norm"):
        coincident_pairs(weight)
    with pytest.raises(ValueError, match="zero norm"):
        unit_neurons(weight.T, layout="in_out")


def test_invalid_arguments():
    with pytest.raises(ValueError, match="s must be"):
        hyperspherical_energy(_weight(4, 3, seed=9), -1.0)
    with pytest.raises(ValueError, match="two neurons"):
        hyperspherical_energy(_weight(1, 3, seed=9))


def test_unit_neurons():
    weight = _weight(4, 3, seed=10)
    unit = unit_neurons(weight)
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(unit_neurons(weight.T, layout="in_out"), unit)
