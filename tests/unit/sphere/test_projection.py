"""The SPHERE projection: eigen-decompositions, the rank rule and the projector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sphere_edit.sphere.projection import (
    SphereProjection,
    eig_descending_direct,
    eig_descending_gram,
    normalize_rows,
    principal_directions,
)


def _weight(n: int, d: int, seed: int, *, spread: bool = True) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=generator, dtype=torch.float64)
    if spread:
        # Anisotropic rows: a clear spectrum with a few dominant directions.
        w = w * torch.logspace(0, -1.5, d, dtype=torch.float64)
        w = w * torch.rand(n, 1, generator=generator, dtype=torch.float64).add(0.2)
    return w


def _brute_force(weight: torch.Tensor, eta: float) -> tuple[int, np.ndarray]:
    """Rank and top eigenvectors from numpy, with a plain loop for the rank rule."""
    w = weight.numpy()
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    c = w.T @ w / w.shape[0]
    values, vectors = np.linalg.eigh(c)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    total = values.sum()
    running = 0.0
    for r, value in enumerate(values, 1):
        running += value
        if running / total >= eta:
            return r, vectors[:, :r]
    raise AssertionError("unreachable")


def _subspace(u) -> torch.Tensor:
    u = torch.as_tensor(u)
    return u @ u.T


# -- eigen-decompositions --------------------------------------------------------------------


@pytest.mark.parametrize(("n", "d"), [(10, 30), (40, 12), (16, 16)])
def test_gram_equals_direct_on_the_nonzero_spectrum(n, d):
    normed = normalize_rows(_weight(n, d, seed=n + d, spread=False))
    values_g, vectors_g = eig_descending_gram(normed)
    values_d, vectors_d = eig_descending_direct(normed)
    rank = min(n, d)
    assert values_g.shape == (rank,)
    assert vectors_g.shape == (d, rank)
    assert values_d.shape == (d,)
    assert torch.all(values_g[:-1] >= values_g[1:])
    assert torch.all(values_d[:-1] >= values_d[1:])
    torch.testing.assert_close(values_g, values_d[:rank], atol=1e-12, rtol=1e-10)
    assert all(abs(float(v)) < 1e-12 for v in values_d[rank:])
    # Unit vectors, orthogonal, eigenvectors of C: compare each pair up to sign.
    eye = torch.eye(rank, dtype=torch.float64)
    torch.testing.assert_close(vectors_g.T @ vectors_g, eye, atol=1e-10, rtol=0)
    dots = (vectors_g * vectors_d[:, :rank]).sum(0).abs()
    torch.testing.assert_close(dots, torch.ones(rank, dtype=torch.float64), atol=1e-8, rtol=0)
    c = normed.T @ normed / n
    torch.testing.assert_close(c @ vectors_g, vectors_g * values_g, atol=1e-12, rtol=0)


def test_gram_drops_the_null_space_of_a_low_rank_weight():
    generator = torch.Generator().manual_seed(3)
    low = torch.randn(50, 4, generator=generator, dtype=torch.float64) @ torch.randn(
        4, 20, generator=generator, dtype=torch.float64
    )
    values, vectors = eig_descending_gram(normalize_rows(low))
    assert values.shape == (4,)
    assert vectors.shape == (20, 4)
    assert torch.isfinite(vectors).all()


# -- the rank rule -----------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.05, 0.3, 0.5, 0.77, 0.9, 0.99, 1.0])
@pytest.mark.parametrize(("n", "d"), [(24, 40), (60, 20)])
def test_rank_is_the_smallest_reaching_eta(eta, n, d):
    weight = _weight(n, d, seed=int(eta * 100) + n)
    u = principal_directions(weight, eta)
    rank, expected = _brute_force(weight, eta)
    assert u.shape == (d, rank)
    assert u.dtype == torch.float64
    torch.testing.assert_close(_subspace(u), _subspace(expected), atol=1e-8, rtol=0)


def test_rank_at_exact_share_boundary():
    """Orthogonal neurons: shares are 1/d, 2/d, ...; eta = 2/d needs exactly 2 directions."""
    weight = torch.eye(5, dtype=torch.float64) * torch.tensor([[1.0], [2.0], [3], [4], [5]])
    assert principal_directions(weight, 0.4).shape[1] == 2
    assert principal_directions(weight, 0.41).shape[1] == 3
    assert principal_directions(weight, 1.0).shape[1] == 5


@pytest.mark.parametrize(("n", "d"), [(20, 35), (45, 15)])
def test_gram_and_direct_methods_give_the_same_directions(n, d):
    weight = _weight(n, d, seed=7)
    for eta in (0.4, 0.8):
        gram = principal_directions(weight, eta, method="gram")
        direct = principal_directions(weight, eta, method="direct")
        assert gram.shape == direct.shape
        torch.testing.assert_close(_subspace(gram), _subspace(direct), atol=1e-8, rtol=0)


def test_principal_directions_ignores_row_norms_and_casts_to_float64():
    weight = _weight(30, 20, seed=11)
    scaled = weight * torch.linspace(0.1, 10.0, 30, dtype=torch.float64)[:, None]
    u = principal_directions(weight.float(), 0.6)
    v = principal_directions(scaled, 0.6)
    assert u.dtype == torch.float64
    torch.testing.assert_close(_subspace(u), _subspace(v), atol=1e-5, rtol=0)


@pytest.mark.parametrize("eta", [0.0, -0.1, 1.01])
def test_invalid_eta(eta):
    with pytest.raises(ValueError, match="eta"):
        principal_directions(_weight(5, 4, seed=0), eta)
    with pytest.raises(ValueError, match="eta"):
        SphereProjection(eta=eta)


@pytest.mark.parametrize("alpha", [-0.01, 1.5])
def test_invalid_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        SphereProjection(alpha=alpha)


def test_invalid_basis():
    with pytest.raises(ValueError, match="basis"):
        SphereProjection(basis="both")


# -- the projector -----------------------------------------------------------------------------


def test_projector_with_alpha_one_is_an_orthogonal_projection():
    u = principal_directions(_weight(30, 20, seed=1), 0.7)
    p = SphereProjection(eta=0.7, alpha=1.0).projector(u)
    torch.testing.assert_close(p @ p, p, atol=1e-12, rtol=0)
    torch.testing.assert_close(p, p.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(p @ u, torch.zeros_like(u), atol=1e-12, rtol=0)
    assert round(float(torch.trace(p))) == 20 - u.shape[1]


def test_projector_with_partial_alpha_is_not_idempotent():
    u = principal_directions(_weight(30, 20, seed=1), 0.7)
    p = SphereProjection(eta=0.7, alpha=0.5).projector(u)
    torch.testing.assert_close(p, p.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(p @ u, 0.5 * u, atol=1e-12, rtol=0)
    assert float((p @ p - p).abs().max()) > 0.1


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_projection_never_grows_the_update(alpha):
    current = _weight(32, 24, seed=2)
    transform = SphereProjection(eta=0.6, alpha=alpha)
    for seed in range(5):
        delta = torch.randn(32, 24, generator=torch.Generator().manual_seed(seed)).double()
        projected = transform(delta, current=current, pre_edit=current)
        assert float(projected.norm()) <= float(delta.norm()) + 1e-12
        u = principal_directions(current, 0.6)
        expected = delta @ transform.projector(u)
        torch.testing.assert_close(projected, expected, atol=1e-12, rtol=0)
    if alpha == 0.0:
        assert torch.equal(transform(delta, current=current, pre_edit=current), delta)


def test_projection_keeps_dtype_and_removes_principal_components():
    current = _weight(32, 24, seed=3)
    transform = SphereProjection(eta=0.5, alpha=1.0)
    u = principal_directions(current, 0.5)
    delta = torch.randn(32, 24, generator=torch.Generator().manual_seed(4))
    projected = transform(delta, current=current, pre_edit=current)
    assert projected.dtype == torch.float32
    assert float((projected.double() @ u).abs().max()) < 1e-5


def test_basis_current_and_pre_edit():
    pre_edit = _weight(30, 20, seed=5)
    current = pre_edit + 0.8 * _weight(30, 20, seed=6, spread=False)
    delta = torch.randn(30, 20, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    by_current = SphereProjection(eta=0.6, alpha=1.0, basis="current")
    by_pre = SphereProjection(eta=0.6, alpha=1.0, basis="pre_edit")
    u_current = by_current.directions(current, pre_edit)
    u_pre = by_pre.directions(current, pre_edit)
    torch.testing.assert_close(u_current, principal_directions(current, 0.6))
    torch.testing.assert_close(u_pre, principal_directions(pre_edit, 0.6))
    assert u_current.shape != u_pre.shape or not torch.allclose(
        _subspace(u_current), _subspace(u_pre), atol=1e-3
    )
    torch.testing.assert_close(
        by_pre(delta, current=current, pre_edit=pre_edit),
        delta @ by_pre.projector(principal_directions(pre_edit, 0.6)),
        atol=1e-12,
        rtol=0,
    )
    torch.testing.assert_close(
        by_current(delta, current=current, pre_edit=pre_edit),
        delta @ by_current.projector(principal_directions(current, 0.6)),
        atol=1e-12,
        rtol=0,
    )


def test_describe():
    assert SphereProjection(0.4, 0.6, "pre_edit").describe() == (
        "SPHERE(eta=0.4, alpha=0.6, basis=pre_edit)"
    )
