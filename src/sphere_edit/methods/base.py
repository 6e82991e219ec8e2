"""The interface every editing method implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch


@dataclass
class LayerState:
    """What a method may use about one edited layer (all in (out, in) layout).

    ``second_moment`` is C0 = E[k kᵀ] over the corpus; ``edited_keys`` is K_p K_pᵀ
    summed over every earlier batch; ``cache`` holds what a method derives once per layer
    (AlphaEdit's projector), so no method keeps module-level state.
    """

    layer: int
    weight_name: str
    pre_edit: torch.Tensor
    second_moment: torch.Tensor
    edited_keys: torch.Tensor
    n_edits: int = 0
    cache: dict[str, Any] = field(default_factory=dict)


class EditMethod(Protocol):
    """Given the keys (n, d_k), the wanted change of the layer's output at them
    (n, d_out) and the layer's state, return ΔW (d_out, d_k) in float64."""

    name: ClassVar[str]

    def update(
        self, keys: torch.Tensor, residuals: torch.Tensor, state: LayerState
    ) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]: ...
