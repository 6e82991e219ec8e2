"""SPHERE variants that go beyond the paper: where the projection sits, and how strong.

The paper (and :class:`~.projection.SphereProjection`) projects a method's finished
update, D = ΔW Q with Q = I − α U Uᵀ acting on ΔW's input (key) side: the update's
response to a key k becomes ΔW (Q k), so the part of every key along U is damped. That
is applied after the solve, so the batch's targets are no longer met as the solve met
them. The variants here wrap any closed-form method (:class:`SphereVariant`), method
agnostic, and change one thing each:

- ``solve``: the projection inside the closed form (see :func:`solve_aware_update`).
- ``budget``: α per layer and batch, the smallest in [0, α_max] that keeps the change of
  the layer's hyperspherical energy within a budget learnt from the method's own first
  batches (see :class:`EnergyBudget`).
- ``cap``: the paper's projection, then the update's Frobenius norm capped at a multiple
  of the pre-edit weight's (see :class:`NormCap`): an outlier batch's update is scaled
  down instead of taking over the layer.
- ``last_alpha``: the last edited layer, the one the targets v* are set at, projected with
  its own strength (lighter, or exempt with 0).

None of them is the default; they are selected by a method spec suffix
(:class:`~sphere_edit.editing.build.MethodSpec`).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from ..methods.base import LayerState
from .energy import hyperspherical_energy
from .projection import SphereProjection

Mode = Literal["project", "solve", "budget", "cap"]


def project_keys(keys: torch.Tensor, directions: torch.Tensor, alpha: float) -> torch.Tensor:
    """Q k for every key (rows of ``keys``, (n, d)), Q = I − α U Uᵀ, in float64."""
    k = keys.double()
    u = directions.to(k.device, torch.float64)
    return k - alpha * (k @ u) @ u.T


def solve_aware_update(
    method: Any, keys: torch.Tensor, residuals: torch.Tensor, state: LayerState, u, alpha
) -> torch.Tensor:
    """The update D = X Q where X is the method's own solve on the projected keys Q K.

    The method fits the residuals R through X applied to Q K, so the update that is
    finally added, D = X Q, meets the targets at the keys K as well as the method's
    solve allows under the constraint, instead of losing part of the fit afterwards.
    The method's preservation terms stay on X, which is what the solve regularises.

    Normal equations. For MEMIT (A = λ C0) X minimises ‖X Q K − R‖² + tr(X A Xᵀ):

        X (Q K Kᵀ Q + A) = R Kᵀ Q,    D = X Q.

    For AlphaEdit (P its null-space projector, K_p K_pᵀ the earlier edits' keys):

        (P (K_p K_pᵀ + Q K Kᵀ Q) + L2·I) Xᵀ = P Q K Rᵀ,    D = X Q.

    Written in D, the penalty tr(X A Xᵀ) = tr(D Q⁻¹ A Q⁻¹ Dᵀ) (α < 1): the corpus
    statistics are inflated by 1/(1 − α) along U, a soft form of the constraint; at α = 1
    D U = 0 exactly. As for the plain projection, D's component along U is X Q U =
    (1 − α) X U. AlphaEdit's guarantee D k0 = 0 for preserved keys holds for X, and for
    D only where Q maps those keys into P's null space, as with the plain projection.
    """
    x = method.update(project_keys(keys, u, alpha), residuals, state)
    x = x.double()
    uu = u.to(x.device, torch.float64)
    return x - alpha * (x @ uu) @ uu.T


@dataclass(frozen=True)
class EnergyBudget:
    """α per layer and batch from a budget on |ΔHE|.

    The first ``batches`` batches of each layer are applied unprojected (α = 0) and their
    |ΔHE| recorded; from then on the budget is ``factor`` × their median and each update
    gets the smallest α in [0, ``alpha_max``] whose projected update changes HE by at most
    the budget, found by ``steps`` bisections on α (α_max where even that exceeds it).
    The bisection assumes |ΔHE| falls as α grows, which is what the projection is for;
    where it does not, the α found still meets the budget or is α_max.
    """

    factor: float = 1.0
    batches: int = 1
    alpha_max: float = 1.0
    steps: int = 12
    energy_s: float = 1.0

    def __post_init__(self) -> None:
        if not self.factor > 0:
            raise ValueError(f"budget factor must be > 0, got {self.factor}")
        if self.batches < 1:
            raise ValueError(f"budget batches must be at least 1, got {self.batches}")
        if not 0 <= self.alpha_max <= 1:
            raise ValueError(f"budget alpha_max must be in [0, 1], got {self.alpha_max}")
        if self.steps < 1:
            raise ValueError(f"budget steps must be at least 1, got {self.steps}")

    def energy_change(self, weight: torch.Tensor, delta: torch.Tensor) -> float:
        w = weight.double()
        return abs(
            hyperspherical_energy(w + delta, self.energy_s)
            - hyperspherical_energy(w, self.energy_s)
        )

    def choose(
        self, weight: torch.Tensor, delta: torch.Tensor, u: torch.Tensor, budget: float
    ) -> float:
        """The smallest α in [0, alpha_max] (to the bisection's resolution) whose
        projected update changes HE by at most ``budget``; α_max if none does."""

        def change(alpha: float) -> float:
            return self.energy_change(weight, delta - alpha * (delta @ u) @ u.T)

        if change(0.0) <= budget:
            return 0.0
        if change(self.alpha_max) > budget:
            return self.alpha_max
        low, high = 0.0, self.alpha_max  # change(low) > budget >= change(high)
        for _ in range(self.steps):
            mid = 0.5 * (low + high)
            if change(mid) <= budget:
                high = mid
            else:
                low = mid
        return high


@dataclass(frozen=True)
class NormCap:
    """A cap on each (projected) update: ‖ΔW‖_F at most ``factor`` × ‖W₀‖_F, W₀ the
    layer's pre-edit weight; a larger update is scaled down to the cap (its direction
    kept). The reference is the pre-edit weight rather than earlier updates, so a resumed
    session caps exactly as an uninterrupted one. MEMIT's schedule gives what a capped
    layer leaves unmet to the layers after it; the last layer's shortfall stays unmet."""

    factor: float = 1.0

    def __post_init__(self) -> None:
        if not self.factor > 0:
            raise ValueError(f"cap factor must be > 0, got {self.factor}")

    def scale(self, delta: torch.Tensor, pre_edit: torch.Tensor) -> float:
        """The factor in (0, 1] that brings ``delta`` within the cap."""
        limit = self.factor * float(pre_edit.double().norm())
        size = float(delta.norm())
        return 1.0 if size <= limit else limit / size


class SphereVariant:
    """A closed-form method with a SPHERE variant inside its ``update``.

    ``mode`` is ``"project"`` (the paper's projection after the solve, here so that the
    last layer can have its own α), ``"solve"`` (:func:`solve_aware_update`) or
    ``"budget"`` (:class:`EnergyBudget`). ``projection`` gives η, α and the basis;
    ``last_alpha`` (if not None) replaces α at ``last_layer``. Every other attribute
    (``single_layer``, ``needs_statistics``, ``restrain``, ...) is the wrapped method's.
    For a method that restrains the sum of its updates (PRUNE) the variant acts on each
    raw update, before the restraint, where the plain projection acts after it.
    """

    def __init__(
        self,
        method: Any,
        projection: SphereProjection,
        *,
        mode: Mode = "project",
        last_alpha: float | None = None,
        last_layer: int | None = None,
        budget: EnergyBudget | None = None,
        cap: NormCap | None = None,
    ) -> None:
        if mode not in ("project", "solve", "budget", "cap"):
            raise ValueError(f"sphere variant: unknown mode {mode!r}")
        if callable(getattr(method, "compute", None)):
            raise ValueError(
                f"method: {method.name} computes ΔW by gradient descent, so a SPHERE variant "
                "cannot enter its solve; use the plain '+sphere'"
            )
        if last_alpha is not None and not 0 <= last_alpha <= 1:
            raise ValueError(f"last_alpha: must be in [0, 1], got {last_alpha}")
        self.inner = method
        self.name = method.name
        self.projection = projection
        self.mode = mode
        self.last_alpha = last_alpha
        self.last_layer = last_layer
        self.budget = budget if budget is not None else EnergyBudget()
        self.cap = cap if cap is not None else NormCap()
        # α (budget mode) or the cap's scale (cap mode) per layer, batch after batch: what
        # diagnostics read.
        self.chosen: dict[int, list[float]] = {}

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not set here: the wrapped method's declarations.
        inner = self.__dict__.get("inner")
        if inner is None:  # not initialised yet (copying, unpickling)
            raise AttributeError(name)
        return getattr(inner, name)

    def alpha_for(self, layer: int) -> float:
        if self.last_alpha is not None and layer == self.last_layer:
            return self.last_alpha
        return self.projection.alpha

    def update(
        self, keys: torch.Tensor, residuals: torch.Tensor, state: LayerState
    ) -> torch.Tensor:
        current = state.current_weight()
        u = self.projection.directions(current, state.pre_edit).to(torch.float64)
        alpha = self.alpha_for(state.layer)
        if self.mode == "solve":
            return solve_aware_update(self.inner, keys, residuals, state, u, alpha)
        delta = self.inner.update(keys, residuals, state).double()
        if self.mode == "budget":
            alpha = self._budget_alpha(state, current, delta, u)
        projected = delta - alpha * (delta @ u) @ u.T
        if self.mode == "cap":
            scale = self.cap.scale(projected, state.pre_edit)
            self.chosen.setdefault(state.layer, []).append(scale)
            projected = scale * projected
        return projected

    def _budget_alpha(
        self, state: LayerState, current: torch.Tensor, delta: torch.Tensor, u: torch.Tensor
    ) -> float:
        seen: list[float] | None = state.cache.get("sphere_budget")
        if seen is None:
            if state.n_edits > 0:
                raise ValueError(
                    "method: +sphere-budget learns its budget from the first batches of a "
                    "session and cannot continue a replayed one; start the run afresh"
                )
            seen = state.cache["sphere_budget"] = []
        if len(seen) < self.budget.batches:
            seen.append(self.budget.energy_change(current, delta))
            alpha = 0.0
        else:
            limit = self.budget.factor * statistics.median(seen)
            alpha = self.budget.choose(current.double(), delta, u, limit)
        self.chosen.setdefault(state.layer, []).append(alpha)
        return alpha

    def describe(self) -> dict[str, Any]:
        variant: dict[str, Any] = {
            "mode": self.mode,
            **asdict(self.projection),
            "last_alpha": self.last_alpha,
            "last_layer": self.last_layer,
        }
        if self.mode == "budget":
            variant["budget"] = asdict(self.budget)
        if self.mode == "cap":
            variant["cap"] = asdict(self.cap)
        return {**self.inner.describe(), "sphere_variant": variant}
