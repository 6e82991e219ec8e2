"""MEMIT and AlphaEdit closed forms, checked against their defining equations (float64)."""

from __future__ import annotations

import pytest
import torch

from sphere_edit.methods import MEMIT, METHODS, AlphaEdit, LayerState, make_method
from sphere_edit.methods.alphaedit import nullspace_projector

D_K, D_OUT = 12, 7


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_spd(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, 3 * d, generator=_generator(seed), dtype=torch.float64)
    return a @ a.T / (3 * d) + 1e-3 * torch.eye(d, dtype=torch.float64)


def _state(second_moment: torch.Tensor, edited_keys: torch.Tensor | None = None) -> LayerState:
    d = second_moment.shape[0]
    return LayerState(
        layer=0,
        weight_name="w",
        pre_edit=torch.zeros(D_OUT, d, dtype=torch.float64),
        second_moment=second_moment,
        edited_keys=(
            torch.zeros(d, d, dtype=torch.float64) if edited_keys is None else edited_keys
        ),
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- MEMIT ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "weight"), [(3, 1.0), (5, 15000.0), (20, 0.5)])
def test_memit_normal_equations(n, weight):
    c0 = _random_spd(D_K, seed=n)
    keys = torch.randn(n, D_K, generator=_generator(100 + n), dtype=torch.float64)
    residuals = torch.randn(n, D_OUT, generator=_generator(200 + n), dtype=torch.float64)
    delta = MEMIT(mom2_weight=weight).update(keys, residuals, _state(c0))
    assert delta.shape == (D_OUT, D_K)
    assert delta.dtype == torch.float64
    k, r = keys.T, residuals.T
    lhs = delta @ (weight * c0 + k @ k.T)
    assert _rel(lhs, r @ k.T) < 1e-10


def test_memit_float32_inputs_give_float64_update():
    c0 = _random_spd(D_K, seed=1)
    keys = torch.randn(4, D_K, generator=_generator(2))
    residuals = torch.randn(4, D_OUT, generator=_generator(3))
    delta = MEMIT(mom2_weight=2.0).update(keys, residuals, _state(c0))
    assert delta.dtype == torch.float64
    k, r = keys.double().T, residuals.double().T
    assert _rel(delta @ (2.0 * c0 + k @ k.T), r @ k.T) < 1e-10


def test_memit_without_regulariser_fits_the_keys_exactly():
    """λ = 0 and as many independent keys as dimensions: ΔW K = R."""
    c0 = _random_spd(D_K, seed=5)
    keys = torch.randn(D_K, D_K, generator=_generator(6), dtype=torch.float64)
    residuals = torch.randn(D_K, D_OUT, generator=_generator(7), dtype=torch.float64)
    delta = MEMIT(mom2_weight=0.0).update(keys, residuals, _state(c0))
    assert _rel(delta @ keys.T, residuals.T) < 1e-9


def test_memit_rejects_negative_weight():
    with pytest.raises(ValueError, match="mom2_weight"):
        MEMIT(mom2_weight=-1.0)


# -- AlphaEdit --------------------------------------------------------------------------------

SMALL = 6  # eigen-directions of C0 below the threshold


def _c0_with_known_spectrum(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """C0 = Q diag(λ) Qᵀ with D_K − SMALL large and SMALL tiny eigenvalues; returns C0
    and the basis of its small-eigenvalue subspace."""
    q, _ = torch.linalg.qr(torch.randn(D_K, D_K, generator=_generator(seed), dtype=torch.float64))
    values = torch.cat(
        [
            torch.linspace(5.0, 0.5, D_K - SMALL, dtype=torch.float64),
            torch.linspace(1e-3, 1e-5, SMALL, dtype=torch.float64),
        ]
    )
    return q @ torch.diag(values) @ q.T, q[:, D_K - SMALL :]


def test_nullspace_projector_is_the_projector_on_small_eigenvectors():
    c0, small = _c0_with_known_spectrum(0)
    p = nullspace_projector(c0, threshold=1e-2)
    torch.testing.assert_close(p, small @ small.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(p @ p, p, atol=1e-12, rtol=0)
    torch.testing.assert_close(p, p.T, atol=1e-12, rtol=0)
    assert round(float(torch.trace(p))) == SMALL
    assert float(nullspace_projector(c0, threshold=1e-9).abs().max()) == 0.0


@pytest.mark.parametrize("with_prior", [False, True])
def test_alphaedit_leaves_the_complement_of_p_untouched(with_prior):
    c0, _ = _c0_with_known_spectrum(1)
    p = nullspace_projector(c0, threshold=1e-2)
    prior = None
    if with_prior:
        kp = torch.randn(D_K, 9, generator=_generator(2), dtype=torch.float64)
        prior = kp @ kp.T
    keys = torch.randn(3, D_K, generator=_generator(3), dtype=torch.float64)
    residuals = torch.randn(3, D_OUT, generator=_generator(4), dtype=torch.float64)
    method = AlphaEdit(nullspace_threshold=1e-2, l2=1.0)
    delta = method.update(keys, residuals, _state(c0, prior))
    assert delta.shape == (D_OUT, D_K)
    assert delta.dtype == torch.float64
    assert float(delta.norm()) > 1e-3  # a real update, not a trivial zero
    preserved = (torch.eye(D_K, dtype=torch.float64) - p) @ torch.randn(
        D_K, 5, generator=_generator(5), dtype=torch.float64
    )
    assert float((delta @ preserved).norm()) < 1e-10 * float(delta.norm() * preserved.norm())
    # And its normal equations: ΔW (A P + L2·I) = R Kᵀ P with A = K_p K_pᵀ + K Kᵀ.
    a = (prior if prior is not None else 0) + keys.T @ keys
    lhs = delta @ (a @ p + 1.0 * torch.eye(D_K, dtype=torch.float64))
    assert _rel(lhs, residuals.T @ keys @ p) < 1e-10


def test_alphaedit_hits_targets_for_keys_in_p_range():
    c0, small = _c0_with_known_spectrum(2)
    coefficients = torch.randn(SMALL, 4, generator=_generator(6), dtype=torch.float64)
    keys = (small @ coefficients).T  # 4 keys in P's range
    residuals = torch.randn(4, D_OUT, generator=_generator(7), dtype=torch.float64)
    delta = AlphaEdit(nullspace_threshold=1e-2, l2=1e-10).update(keys, residuals, _state(c0))
    assert _rel(delta @ keys.T, residuals.T) < 1e-6


def test_alphaedit_keys_outside_p_cannot_be_fitted():
    """A key orthogonal to P's range gets no update at all."""
    c0, small = _c0_with_known_spectrum(3)
    p = small @ small.T
    outside = (torch.eye(D_K, dtype=torch.float64) - p) @ torch.randn(
        D_K, 1, generator=_generator(8), dtype=torch.float64
    )
    residuals = torch.randn(1, D_OUT, generator=_generator(9), dtype=torch.float64)
    delta = AlphaEdit(nullspace_threshold=1e-2, l2=1e-6).update(outside.T, residuals, _state(c0))
    assert float(delta.abs().max()) < 1e-8


def test_alphaedit_caches_projector_per_threshold():
    c0, small = _c0_with_known_spectrum(4)
    state = _state(c0)
    method = AlphaEdit(nullspace_threshold=1e-2)
    first = method.projector(state)
    assert method.projector(state) is first
    other = AlphaEdit(nullspace_threshold=1.0).projector(state)
    assert other is not first
    assert round(float(torch.trace(other))) == SMALL + 1  # 0.5 is the next eigenvalue
    torch.testing.assert_close(first, small @ small.T, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"nullspace_threshold": 0.0}, "threshold"), ({"l2": -1.0}, "l2")],
)
def test_alphaedit_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AlphaEdit(**kwargs)


def test_make_method():
    assert isinstance(make_method("memit", mom2_weight=3.0), MEMIT)
    assert make_method("alphaedit", l2=2.0) == AlphaEdit(l2=2.0)
    assert set(METHODS) == {"memit", "alphaedit", "ft", "rome", "rect", "prune", "ultraedit"}
    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        make_method("bogus")
    assert make_method("memit", mom2_weight=3.0).describe() == {
        "method": "memit",
        "mom2_weight": 3.0,
    }
