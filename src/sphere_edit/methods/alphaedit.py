"""AlphaEdit: the update is confined to the null space of the preserved keys.

P projects onto the eigenvectors of C0 = E[k kᵀ] whose eigenvalues are below
``nullspace_threshold``: directions the corpus keys barely use. With K_p K_pᵀ the keys
of all earlier edits, ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + L2·I)⁻¹. The solution X of
(P A + L2·I) X = P K Rᵀ satisfies (I − P) X = 0, so ΔW = Xᵀ maps every key outside
P's range to zero: the preserved knowledge is untouched.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from ..common.linalg import solve_on
from .base import LayerState
from .registry import Option, register_method


def nullspace_projector(second_moment: torch.Tensor, threshold: float) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(second_moment.double())
    small = vectors[:, values < threshold]
    return small @ small.T


# The threshold is absolute on C0's eigenvalues, whose scale depends on the model's
# keys: any positive value is meaningful (above the largest eigenvalue P is the identity).
@register_method(
    help="MEMIT confined to the null space of the preserved keys",
    options=(
        Option(
            "nullspace_threshold",
            float,
            2e-2,
            "eigenvalues of C0 below it span the null space",
            low=0,
            low_open=True,
        ),
        Option("l2", float, 10.0, "ridge term L2 of the solve", low=0),
    ),
    sphere_alpha=0.5,
    sphere_alpha_key="alpha_alphaedit",
)
@dataclass(frozen=True)
class AlphaEdit:
    name: ClassVar[str] = "alphaedit"
    # AlphaEdit's code projects each layer's update before the next layer is read.
    transform_order: ClassVar[str] = "inside"
    nullspace_threshold: float = 2e-2
    l2: float = 10.0

    def projector(self, state: LayerState) -> torch.Tensor:
        cached = state.cache.get("alphaedit_projector")
        if cached is None or cached[0] != self.nullspace_threshold:
            cached = (
                self.nullspace_threshold,
                nullspace_projector(state.second_moment, self.nullspace_threshold),
            )
            state.cache["alphaedit_projector"] = cached
        return cached[1]

    def update(
        self, keys: torch.Tensor, residuals: torch.Tensor, state: LayerState
    ) -> torch.Tensor:
        # On a GPU the d³ products and the solve run there (a no-op move on the CPU).
        at = state.current_weight().device
        p = self.projector(state).to(at)
        k = keys.to(at).double().T  # (d_k, n)
        r = residuals.to(at).double().T  # (d_out, n)
        d = k.shape[0]
        system = p @ (state.edited_keys.to(at).double() + k @ k.T)
        system += self.l2 * torch.eye(d, dtype=system.dtype, device=at)
        what = f"alphaedit system of layer {state.layer}"
        return solve_on(at, system, p @ k @ r.T, what=what).T.to(keys.device)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **asdict(self)}
