"""The interfaces every editing method implements.

There are two kinds of method:

- :class:`EditMethod` (closed form): given the keys of the edited requests at one layer
  and the wanted change of that layer's output at them, return ΔW. The session computes
  the keys and the targets v* (MEMIT, AlphaEdit, ROME, RECT, PRUNE).
- :class:`GradientMethod`: given the model and the requests, return ΔW directly (FT). The
  session hands it an :class:`EditContext`.

Either way the session owns what happens to ΔW afterwards (the SPHERE projection, adding
it to the model, the journal), so a method never touches the model's weights for good.

Optional class attributes and methods a method may declare (the session reads them with
the helpers at the bottom of this module):

- ``single_layer = True``: the method edits exactly one layer (ROME, FT).
- ``per_request = True``: the requests of a batch are edited one after another, each with
  its own v*, key and update, all in the same journal entry (ROME).
- ``needs_statistics = False``: the method does not use C0 (FT), so no corpus is read.
- ``restrain(accumulated, state) -> Tensor``: the model carries W0 + restrain(Σ ΔW) rather
  than W0 + Σ ΔW; the session keeps the raw sum Σ ΔW in ``LayerState.accumulated`` (PRUNE).
- ``edit_restrained``: with ``restrain``, whether the next batch edits the restrained model
  (True) or the raw sum, the restrained one being only evaluated (False, PRUNE's default).
- ``finalize(delta, state) -> Tensor``: a last step on a layer's ΔW, placed by the schedule
  like the SPHERE projection (RECT's sparsification).
- ``transform_order = "inside" | "after"``: the method's default place of the SPHERE
  projection and ``finalize`` in MEMIT's schedule (``EditSession``); "inside" if undeclared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..editing.requests import EditRequest
    from ..model.arch import ModelLayout


@dataclass
class LayerState:
    """What a method may use about one edited layer (all in (out, in) layout).

    ``second_moment`` is C0 = E[k kᵀ] over the corpus; ``edited_keys`` is K_p K_pᵀ
    summed over every earlier batch; ``cache`` holds what a method derives once per layer
    (AlphaEdit's projector), so no method keeps module-level state. ``weight`` is the
    layer's weight as it is when the update is asked for (set by the session before each
    call; RECT measures relative change against it). ``accumulated`` is the sum of every
    earlier raw update, kept only for methods that restrain it (PRUNE).
    """

    layer: int
    weight_name: str
    pre_edit: torch.Tensor
    second_moment: torch.Tensor
    edited_keys: torch.Tensor
    n_edits: int = 0
    cache: dict[str, Any] = field(default_factory=dict)
    weight: torch.Tensor | None = None
    accumulated: torch.Tensor | None = None

    def current_weight(self) -> torch.Tensor:
        """The weight now, or the pre-edit weight when the session has not set it."""
        return self.pre_edit if self.weight is None else self.weight


class EditMethod(Protocol):
    """Given the keys (n, d_k), the wanted change of the layer's output at them
    (n, d_out) and the layer's state, return ΔW (d_out, d_k) in float64."""

    name: ClassVar[str]

    def update(
        self, keys: torch.Tensor, residuals: torch.Tensor, state: LayerState
    ) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class EditContext:
    """What a gradient method may use: the model (whose weights it may change while it
    works, but must leave as it found them), its layout and tokenizer, the session's
    context templates and the edited layer's state."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    layout: ModelLayout
    templates: list[str]
    state: LayerState


@dataclass
class GradientResult:
    """ΔW (d_out, d_k) in float64, and the final loss of each request."""

    delta: torch.Tensor
    loss: list[float]
    steps: int


class GradientMethod(Protocol):
    """A method that optimises the weight itself: ``compute`` returns ΔW for ``layer``
    and leaves the model's weights exactly as they were."""

    name: ClassVar[str]

    def compute(
        self, context: EditContext, requests: Sequence[EditRequest], layer: int
    ) -> GradientResult: ...

    def describe(self) -> dict[str, Any]: ...


def is_gradient_method(method: object) -> bool:
    return callable(getattr(method, "compute", None))


def edits_single_layer(method: object) -> bool:
    return bool(getattr(method, "single_layer", False))


def edits_per_request(method: object) -> bool:
    return bool(getattr(method, "per_request", False))


def needs_statistics(method: object) -> bool:
    return bool(getattr(method, "needs_statistics", True))


def restrains(method: object) -> bool:
    return callable(getattr(method, "restrain", None))


def finalizes(method: object) -> bool:
    return callable(getattr(method, "finalize", None))


def edits_restrained(method: object) -> bool:
    return bool(getattr(method, "edit_restrained", True))


def default_transform_order(method: object) -> str:
    return str(getattr(method, "transform_order", "inside"))
