"""SPHERE variants beyond the paper: the solve-aware update, the HE budget, per-layer α."""

from __future__ import annotations

import pytest
import torch

from sphere_edit.editing.build import MethodSpec, build_session
from sphere_edit.methods import AlphaEdit
from sphere_edit.methods.base import LayerState
from sphere_edit.methods.memit import MEMIT
from sphere_edit.sphere.energy import hyperspherical_energy
from sphere_edit.sphere.projection import SphereProjection, principal_directions
from sphere_edit.sphere.variants import EnergyBudget, NormCap, SphereVariant
from tests.unit._helpers import requests_abc, tiny_loaded

D_OUT, D_K, N = 12, 20, 5


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(D_OUT, D_K, generator=g, dtype=torch.float64)
    weight = weight * torch.logspace(0, -1, D_K, dtype=torch.float64)  # a clear spectrum
    corpus = torch.randn(200, D_K, generator=g, dtype=torch.float64)
    corpus = corpus * torch.logspace(0.5, -1.5, D_K, dtype=torch.float64)  # some unused keys
    moment = corpus.T @ corpus / corpus.shape[0]
    earlier = torch.randn(4, D_K, generator=g, dtype=torch.float64)
    state = LayerState(
        layer=3,
        weight_name="w",
        pre_edit=weight,
        second_moment=moment,
        edited_keys=earlier.T @ earlier,
    )
    keys = torch.randn(N, D_K, generator=g, dtype=torch.float64)
    residuals = torch.randn(N, D_OUT, generator=g, dtype=torch.float64)
    return state, keys, residuals


def _q(u: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.eye(u.shape[0], dtype=torch.float64) - alpha * u @ u.T


def test_solve_variant_meets_memit_normal_equations():
    state, keys, residuals = _problem()
    projection = SphereProjection(eta=0.5, alpha=0.6)
    memit = MEMIT(mom2_weight=2.0)
    update = SphereVariant(memit, projection, mode="solve").update(keys, residuals, state)
    u = principal_directions(state.pre_edit, 0.5)
    q = _q(u, 0.6)
    k, r = keys.T, residuals.T
    # D = X Q; X (Q K Kᵀ Q + λ C0) = R Kᵀ Q.
    x = update @ torch.linalg.inv(q)
    lhs = x @ (q @ k @ k.T @ q + 2.0 * state.second_moment)
    torch.testing.assert_close(lhs, r @ k.T @ q, rtol=1e-9, atol=1e-9)
    # Its component along U is (1 − α) times that of X.
    torch.testing.assert_close(update @ u, 0.4 * x @ u, rtol=1e-9, atol=1e-9)


def test_solve_variant_meets_alphaedit_normal_equations():
    state, keys, residuals = _problem(1)
    alphaedit = AlphaEdit(nullspace_threshold=0.05, l2=0.1)
    projection = SphereProjection(eta=0.5, alpha=0.5)
    update = SphereVariant(alphaedit, projection, mode="solve").update(keys, residuals, state)
    u = principal_directions(state.pre_edit, 0.5)
    q = _q(u, 0.5)
    values, vectors = torch.linalg.eigh(state.second_moment)
    small = vectors[:, values < 0.05]
    p = small @ small.T
    assert 0 < small.shape[1] < D_K  # P neither zero nor the identity
    k, r = keys.T, residuals.T
    xt = (update @ torch.linalg.inv(q)).T
    system = p @ (state.edited_keys + q @ k @ k.T @ q) + 0.1 * torch.eye(D_K, dtype=torch.float64)
    torch.testing.assert_close(system @ xt, p @ q @ k @ r.T, rtol=1e-9, atol=1e-9)


def _memit_objective(x, q, keys, residuals, moment, weight):
    fit = x @ q @ keys.T - residuals.T
    return float((fit**2).sum() + weight * torch.trace(x @ moment @ x.T))


def test_solve_variant_fits_at_least_as_well_as_projecting_after_the_solve():
    state, keys, residuals = _problem(2)
    projection = SphereProjection(eta=0.5, alpha=0.8)
    u = principal_directions(state.pre_edit, 0.5)
    q = _q(u, 0.8)
    # Its objective (fit of D = X Q plus the penalty on X) is no larger than at X0, the
    # plain solve that is projected afterwards, for any penalty weight.
    for weight in (1e-6, 0.1, 10.0):
        memit = MEMIT(mom2_weight=weight)
        solved = SphereVariant(memit, projection, mode="solve").update(keys, residuals, state)
        x0 = memit.update(keys, residuals, state)
        x = solved @ torch.linalg.inv(q)
        args = (keys, residuals, state.second_moment, weight)
        assert _memit_objective(x, q, *args) <= _memit_objective(x0, q, *args) + 1e-9
    # With a negligible penalty the fit itself: exact for the solve, not after projecting.
    memit = MEMIT(mom2_weight=1e-8)
    solved = SphereVariant(memit, projection, mode="solve").update(keys, residuals, state)
    after = SphereVariant(memit, projection, mode="project").update(keys, residuals, state)
    fit_solved = (solved @ keys.T - residuals.T).norm()
    fit_after = (after @ keys.T - residuals.T).norm()
    assert fit_solved < 1e-4 * residuals.norm() < fit_after


def test_project_mode_equals_the_plain_projection_and_last_alpha_applies():
    state, keys, residuals = _problem(3)
    projection = SphereProjection(eta=0.5, alpha=0.5)
    memit = MEMIT(mom2_weight=1.0)
    raw = memit.update(keys, residuals, state)
    plain = projection(raw, current=state.pre_edit, pre_edit=state.pre_edit)
    variant = SphereVariant(memit, projection, last_alpha=0.0, last_layer=7)
    assert torch.equal(variant.update(keys, residuals, state), plain)  # layer 3: not last
    exempt = SphereVariant(memit, projection, last_alpha=0.0, last_layer=3)
    assert torch.equal(exempt.update(keys, residuals, state), raw)
    lighter = SphereVariant(memit, projection, last_alpha=0.2, last_layer=3)
    expected = SphereProjection(eta=0.5, alpha=0.2)(
        raw, current=state.pre_edit, pre_edit=state.pre_edit
    )
    torch.testing.assert_close(lighter.update(keys, residuals, state), expected)


def test_budget_keeps_the_energy_change_within_the_budget_or_uses_alpha_max():
    state, keys, residuals = _problem(4)
    budget = EnergyBudget(factor=0.3, batches=1, alpha_max=1.0, steps=20)
    variant = SphereVariant(MEMIT(mom2_weight=1.0), SphereProjection(eta=0.5), mode="budget")
    variant.budget = budget
    first = variant.update(keys, residuals, state)
    # The first batch is unprojected and sets the budget.
    assert torch.equal(first, MEMIT(mom2_weight=1.0).update(keys, residuals, state))
    limit = 0.3 * budget.energy_change(state.pre_edit, first)
    for seed in (5, 6, 7):
        _, keys_i, residuals_i = _problem(seed)
        update = variant.update(keys_i, residuals_i, state)
        alpha = variant.chosen[3][-1]
        he = hyperspherical_energy
        change = abs(he(state.pre_edit + update) - he(state.pre_edit))
        assert change <= limit + 1e-12 or alpha == 1.0
        if 0 < alpha < 1:  # the smallest α: a little less breaks the budget
            u = principal_directions(state.pre_edit, 0.5)
            raw = MEMIT(mom2_weight=1.0).update(keys_i, residuals_i, state)
            less = raw - (alpha - 2e-6) * (raw @ u) @ u.T
            assert abs(he(state.pre_edit + less) - he(state.pre_edit)) > limit
    assert any(0 < a for a in variant.chosen[3][1:])  # the budget bit at least once


def test_budget_choose_on_a_known_curve():
    # HE change must fall with α; bisection returns the smallest α within the budget.
    state, keys, residuals = _problem(8)
    budget = EnergyBudget(steps=30)
    delta = MEMIT(mom2_weight=1.0).update(keys, residuals, state)
    u = principal_directions(state.pre_edit, 0.5)
    full = budget.energy_change(state.pre_edit, delta)
    assert budget.choose(state.pre_edit, delta, u, full) == 0.0
    assert budget.choose(state.pre_edit, delta, u, 0.0) == 1.0


@pytest.mark.parametrize(
    ("text", "variant", "options"),
    [
        ("alphaedit+sphere", "project", ()),
        ("alphaedit+sphere-solve", "solve", ()),
        ("memit+sphere-budget:budget_factor=2", "budget", (("budget_factor", 2.0),)),
        ("rect+sphere:alpha=0.3:last_alpha=0", "project", (("alpha", 0.3), ("last_alpha", 0.0))),
    ],
)
def test_spec_suffixes_round_trip(text, variant, options):
    spec = MethodSpec.parse(text)
    assert (spec.sphere, spec.variant, spec.options) == (True, variant, options)
    assert MethodSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("memit+sphere-fancy", "the suffixes are"),
        ("memit:alpha=0.3", "no '\\+sphere' suffix"),
        ("memit+sphere:gamma=1", "name=value with a name among"),
        ("memit+sphere:alpha=big", "alpha .* must be a number"),
    ],
)
def test_bad_specs_name_the_fix(text, message):
    with pytest.raises(ValueError, match=message):
        MethodSpec.parse(text)


def test_plain_sphere_session_is_unchanged_and_variants_wrap_the_method(tiny_tokenizer):
    loaded = tiny_loaded(tiny_tokenizer, "llama")
    kwargs = dict(layers=[1, 2], corpus=None, stats_tokens=500, progress=False, log=lambda _: 0)
    plain = build_session(loaded, "memit+sphere", **kwargs)
    assert isinstance(plain.transform, SphereProjection)
    assert not isinstance(plain.method, SphereVariant)
    solve = build_session(loaded, "memit+sphere-solve:alpha=0.7", **kwargs)
    assert solve.transform is None and solve.method.mode == "solve"
    assert solve.method.projection.alpha == 0.7
    assert solve.header()["method"]["sphere_variant"]["mode"] == "solve"
    last = build_session(loaded, "memit+sphere:last_alpha=0", **kwargs)
    assert last.method.alpha_for(2) == 0.0
    assert last.method.alpha_for(1) == last.method.projection.alpha > 0
    result = solve.apply(requests_abc())
    assert all(torch.isfinite(torch.tensor(v)) for v in result.update_norms.values())
    with pytest.raises(ValueError, match="gradient descent"):
        build_session(loaded, "ft+sphere-solve", **kwargs)


def test_cap_scales_only_an_update_above_the_cap_and_keeps_its_direction():
    state, keys, residuals = _problem(8)
    projection = SphereProjection(eta=0.5, alpha=0.5)
    projected = SphereVariant(MEMIT(mom2_weight=1.0), projection).update(keys, residuals, state)
    ratio = float(projected.norm() / state.pre_edit.norm())
    below = SphereVariant(MEMIT(mom2_weight=1.0), projection, mode="cap", cap=NormCap(2 * ratio))
    assert torch.equal(below.update(keys, residuals, state), projected)  # under the cap
    above = SphereVariant(MEMIT(mom2_weight=1.0), projection, mode="cap", cap=NormCap(ratio / 4))
    capped = above.update(keys, residuals, state)
    torch.testing.assert_close(capped.norm(), state.pre_edit.norm() * ratio / 4)
    torch.testing.assert_close(capped, projected / 4)
    assert above.chosen[3] == [pytest.approx(0.25)]
    assert above.describe()["sphere_variant"]["cap"] == {"factor": ratio / 4}
    with pytest.raises(ValueError, match="cap factor must be > 0"):
        NormCap(0.0)


def test_cap_spec_parses_and_builds(tiny_tokenizer):
    spec = MethodSpec.parse("alphaedit+sphere-cap:cap_factor=0.5")
    assert spec.variant == "cap" and dict(spec.options) == {"cap_factor": 0.5}
    loaded = tiny_loaded(tiny_tokenizer)
    session = build_session(loaded, spec, layers=[1, 2], stats_tokens=500, progress=False,
                            log=lambda _: None)  # fmt: skip
    assert session.method.cap == NormCap(0.5)
    session.apply(requests_abc())
