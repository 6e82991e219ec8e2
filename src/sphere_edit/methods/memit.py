"""MEMIT: ΔW = R Kᵀ (λ C0 + K Kᵀ)⁻¹, the least-squares update that fits the new keys
while staying close on the corpus keys (weight λ, the mom2 update weight)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from ..common.linalg import solve_on
from .base import LayerState
from .registry import Option, register_method

MOM2_WEIGHT = Option(
    "mom2_weight", float, 15000.0, "weight λ of the corpus statistics C0 in the solve", low=0
)


@register_method(
    help="least-squares update of several layers, kept close on the corpus keys",
    options=(MOM2_WEIGHT,),
)
@dataclass(frozen=True)
class MEMIT:
    name: ClassVar[str] = "memit"
    # The authors' MEMIT runs its schedule with the dense updates and projects afterwards.
    transform_order: ClassVar[str] = "after"
    mom2_weight: float = 15000.0

    def update(
        self, keys: torch.Tensor, residuals: torch.Tensor, state: LayerState
    ) -> torch.Tensor:
        at = state.current_weight().device  # a GPU's model: the solve runs there
        k = keys.double().T  # (d_k, n)
        r = residuals.double().T  # (d_out, n)
        system = self.mom2_weight * state.second_moment.double() + k @ k.T
        # ΔW = R Kᵀ A⁻¹ = R (A⁻¹ K)ᵀ since A is symmetric.
        return r @ solve_on(at, system, k, what=f"memit system of layer {state.layer}").T

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **asdict(self)}
