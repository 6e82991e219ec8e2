"""PRUNE: MEMIT's updates, with the singular values of their sum restrained.

The model carries W0 + restrain(Δ), where Δ = Σ ΔW is the sum of the raw MEMIT updates
of every batch so far and W0 the weight before the first edit. With Δ = U diag(σ) Vᵀ and
σ_max the largest singular value of W0, every σ > σ_max becomes

    log_b(σ) + σ_max − log_b(σ_max)

(b = ``log_base``, e by default), which is continuous at σ_max and grows only
logarithmically beyond it; smaller singular values are left as they are.

Which model the next batch edits is ``edit_restrained``: False (the authors' PRUNE, the
default) keeps W0 + Δ live and evaluates (and exports) W0 + restrain(Δ); True edits the
restrained model itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from .base import LayerState
from .memit import MEMIT, MOM2_WEIGHT
from .registry import Option, register_method


def restrain_singular_values(
    values: torch.Tensor, sigma_max: float, log_base: float = math.e
) -> torch.Tensor:
    log = math.log(log_base)
    above = values > sigma_max
    safe = torch.where(above, values, torch.ones_like(values))  # keep log() finite
    mapped = torch.log(safe) / log + sigma_max - math.log(sigma_max) / log
    return torch.where(above, mapped, values)


@register_method(
    help="MEMIT's updates with the large singular values of their sum restrained",
    options=(
        MOM2_WEIGHT,
        Option(
            "log_base", float, math.e, "base of the logarithm restraining σ", low=1, low_open=True
        ),
        Option(
            "edit_restrained",
            bool,
            False,
            "edit the restrained model (true) or the raw sum, evaluating the restrained one",
        ),
    ),
    inherits=("memit",),
)
@dataclass(frozen=True)
class PRUNE:
    name: ClassVar[str] = "prune"
    # The authors' PRUNE runs MEMIT's schedule with the dense updates.
    transform_order: ClassVar[str] = "after"
    mom2_weight: float = 15000.0
    log_base: float = math.e
    edit_restrained: bool = False

    def update(
        self, keys: torch.Tensor, residuals: torch.Tensor, state: LayerState
    ) -> torch.Tensor:
        return MEMIT(mom2_weight=self.mom2_weight).update(keys, residuals, state)

    def sigma_max(self, state: LayerState) -> float:
        cached = state.cache.get("prune_sigma_max")
        if cached is None:
            cached = float(torch.linalg.matrix_norm(state.pre_edit.double(), ord=2))
            state.cache["prune_sigma_max"] = cached
        return cached

    def restrain(self, accumulated: torch.Tensor, state: LayerState) -> torch.Tensor:
        """U diag(restrained σ) Vᵀ of the accumulated raw update (float64)."""
        u, values, vh = torch.linalg.svd(accumulated.double(), full_matrices=False)
        values = restrain_singular_values(values, self.sigma_max(state), self.log_base)
        return (u * values) @ vh

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **asdict(self)}
