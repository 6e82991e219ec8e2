"""RECT: MEMIT's update, sparsified to the entries with the largest relative change.

After ΔW is solved as MEMIT does (``update``), ``finalize`` keeps only the
``keep_fraction`` of its entries with the largest |ΔW_ij / W_ij| (counted over the whole
matrix) and sets the rest to zero, W being the layer's weight just before this update;
the session's schedule decides when (``transform_order``). An entry whose weight is
exactly zero has an infinite relative change when ΔW_ij ≠ 0 (it ranks first) and none
when ΔW_ij = 0 too (it ranks last), so the ratio is never NaN.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from .base import LayerState
from .memit import MEMIT, MOM2_WEIGHT
from .registry import Option, register_method


def relative_change(delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """|ΔW / W| with x/0 = inf for x ≠ 0 and 0/0 = 0."""
    change, size = delta.abs(), weight.abs()
    ratio = change / torch.where(size > 0, size, torch.ones_like(size))
    infinite = torch.full_like(ratio, float("inf"))
    return torch.where(size > 0, ratio, torch.where(change > 0, infinite, 0.0))


def keep_largest(delta: torch.Tensor, score: torch.Tensor, fraction: float) -> torch.Tensor:
    """``delta`` with all but the round(fraction · size) entries of largest score zeroed."""
    count = round(fraction * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    if count > 0:
        mask[torch.topk(score.flatten(), count).indices] = True
    return torch.where(mask.view_as(delta), delta, torch.zeros_like(delta))


@register_method(
    help="MEMIT's update, keeping only the entries of largest relative change",
    options=(
        Option(
            "keep_fraction", float, 0.4, "share of ΔW's entries kept", low=0, high=1, low_open=True
        ),
        MOM2_WEIGHT,
    ),
    inherits=("memit",),
)
@dataclass(frozen=True)
class RECT:
    name: ClassVar[str] = "rect"
    # The authors' RECT sparsifies when the deltas of the dense schedule are added.
    transform_order: ClassVar[str] = "after"
    keep_fraction: float = 0.4
    mom2_weight: float = 15000.0

    def update(
        self, keys: torch.Tensor, residuals: torch.Tensor, state: LayerState
    ) -> torch.Tensor:
        """MEMIT's dense ΔW; :meth:`finalize` sparsifies it where the schedule says."""
        return MEMIT(mom2_weight=self.mom2_weight).update(keys, residuals, state)

    def finalize(self, delta: torch.Tensor, state: LayerState) -> torch.Tensor:
        """``delta`` with only the ``keep_fraction`` of entries of largest |ΔW / W| kept, W
        being the layer's weight before this batch's update of it."""
        score = relative_change(delta, state.current_weight().double())
        return keep_largest(delta, score, self.keep_fraction)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **asdict(self)}
