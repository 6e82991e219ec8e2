"""ROME: a rank-one update of one layer, one request at a time.

With k* the request's key (averaged over the context templates) and r = v* − W k* the
wanted change of the layer's output at it, the update is

    ΔW = r uᵀ / (uᵀ k*),   u = C0⁻¹ k*,

so that (W + ΔW) k* = v*, while keys x with uᵀx = k*ᵀ C0⁻¹ x ≈ 0 (those the corpus
statistics say are unlike k*) are left alone. This is the minimiser of the C0-weighted
change ‖ΔW‖ subject to the constraint, i.e. MEMIT for one key with an infinitely heavy
preservation term.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from ..common.linalg import Factorization, factorize
from .base import LayerState
from .registry import register_method


@register_method(help="rank-one update of one layer, one request at a time")
@dataclass(frozen=True)
class ROME:
    name: ClassVar[str] = "rome"
    single_layer: ClassVar[bool] = True
    per_request: ClassVar[bool] = True

    def factor(self, state: LayerState) -> Factorization:
        """LU factors of C0, computed once per layer (least squares if C0 is singular)."""
        cached = state.cache.get("rome_lu")
        if cached is None:
            cached = factorize(state.second_moment.double())
            state.cache["rome_lu"] = cached
        return cached

    def left_vector(self, key: torch.Tensor, state: LayerState) -> torch.Tensor:
        """u = C0⁻¹ k*, scaled to unit norm (the scale cancels in the update)."""
        what = f"rome C0 of layer {state.layer}"
        u = self.factor(state).solve(key.double(), what=what)
        return u / u.norm()

    def update(
        self, keys: torch.Tensor, residuals: torch.Tensor, state: LayerState
    ) -> torch.Tensor:
        if keys.shape[0] != 1:
            raise ValueError(
                f"rome edits one request at a time, got {keys.shape[0]} keys; the session "
                "applies a batch request by request"
            )
        key, residual = keys[0].double(), residuals[0].double()
        u = self.left_vector(key, state)
        scale = torch.dot(u, key)
        if not bool(scale.abs() > 0):
            raise ValueError("rome: uᵀk* is zero (the key is zero or C0 is singular there)")
        return torch.outer(residual, u) / scale

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **asdict(self)}
