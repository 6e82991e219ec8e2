"""The routes that compute one batch's update, each a function of the session it edits.

- :func:`closed_form`: v* for the whole batch, then MEMIT's schedule (:func:`spread`);
- :func:`one_by_one`: the same, one request at a time (``per_request`` methods: ROME);
- :func:`gradient`: ΔW from the method's own ``compute`` (gradient methods: FT);
- :func:`modules_route`: methods editing other modules than the MLP output (UltraEdit);
- :func:`commit` and :func:`commit_module`: the SPHERE transform and the write into the
  weight that every ΔW goes through.

:meth:`EditSession.apply <sphere_edit.editing.session.EditSession.apply>` picks the route
and undoes the weights on any error. This module holds no session state of its own and does
not import the session module at run time (the session imports it).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..common.faults import fault_point
from ..common.linalg import IllConditionedWarning
from ..common.progress import Progress
from ..methods import LayerState
from ..methods.base import EditContext, edits_restrained, finalizes, restrains
from .journal import MLP_OUT, add_deltas, restore_weights, snapshot_weights
from .keys import LowerLayers, key_precision, read_layer, residual_to_mlp_delta
from .requests import EditRequest, RequestError
from .vstar import VStarResult

if TYPE_CHECKING:  # only for the annotations: the session module imports this one
    from .session import EditSession


class NumericalError(ValueError):
    """A batch produced NaN or Inf; the model and journal were left as they were."""


@dataclass
class _Edit:
    """What one way of editing a batch produced (see ``EditSession.apply``)."""

    deltas: dict[str, torch.Tensor]
    keys: dict[int, torch.Tensor]
    raw: dict[int, torch.Tensor]
    norms: dict[int, float]
    loss: list[float]
    steps: list[int]
    notes: list[str] = field(default_factory=list)
    vstar: VStarResult | None = None  # the batch's v*, where one v* served every request
    method_state: dict[str, torch.Tensor] | None = None  # "<layer>.<module>.<name>"


def closed_form(
    session: EditSession,
    requests: list[EditRequest],
    templates: list[str],
    precomputed: VStarResult | None,
    timings: dict[str, float],
) -> _Edit:
    """The closed-form route: v* for every request together, then MEMIT's schedule."""
    with _timed(timings, "targets"):
        result = precomputed if precomputed is not None else session._compute_vstar(requests)
    _require_finite(result.vectors, requests, "target vector")
    notes: list[str] = []
    with key_precision(session.target.bf16):  # the key passes run as the v* passes did
        deltas, keys, raw, norms = spread(session, requests, templates, result, timings, notes)
    loss, steps = [float(x) for x in result.loss], [int(x) for x in result.steps]
    return _Edit(deltas, keys, raw, norms, loss, steps, notes, vstar=result)


def one_by_one(
    session: EditSession,
    requests: list[EditRequest],
    templates: list[str],
    backup: dict[int, torch.Tensor],
    timings: dict[str, float],
) -> _Edit:
    """Each request edited on the weights its predecessors left (ROME). The batch is
    then journaled as one delta per weight, their sum, added once to the weights as
    they were: exactly what a replay of the journal does."""
    parts = []
    for i, request in enumerate(requests):
        try:
            parts.append(closed_form(session, [request], templates, None, timings))
        except RequestError as error:
            raise error.at(i) from None
    deltas: dict[str, torch.Tensor] = {}
    norms: dict[int, float] = {}
    for layer in session.layers:
        name = session.states[layer].weight_name
        total = torch.stack([part.deltas[name].double() for part in parts]).sum(0)
        norms[layer] = float(total.norm())
        deltas[name] = total.to(backup[layer].dtype).contiguous()
    restore_weights(session.layout, backup)
    add_deltas(session.layout, session.layers, deltas)
    keys = {layer: torch.cat([part.keys[layer] for part in parts]) for layer in session.layers}
    loss = [x for part in parts for x in part.loss]
    steps = [x for part in parts for x in part.steps]
    notes = [x for part in parts for x in part.notes]
    return _Edit(deltas, keys, {}, norms, loss, steps, notes)


def gradient(
    session: EditSession,
    requests: list[EditRequest],
    templates: list[str],
    timings: dict[str, float],
) -> _Edit:
    """A gradient method computes ΔW itself; the keys are read for the journal."""
    model, tok, layout = session.loaded.model, session.loaded.tokenizer, session.layout
    deltas, keys, raw, norms = {}, {}, {}, {}
    loss: list[float] = []
    steps: list[int] = []
    notes: list[str] = []
    for layer in session.layers:
        with _timed(timings, "keys"):
            readout = read_layer(
                model, tok, layout, layer, layer, requests, templates, bf16=session.target.bf16
            )
            _require_finite(readout.keys, requests, f"key at layer {layer}")

        state = session.states[layer]
        with _timed(timings, "solve"):
            context = EditContext(model, tok, layout, templates, state)
            with _solver_notes(notes):
                result = session.method.compute(context, requests, layer)  # type: ignore[union-attr]
        loss, steps = result.loss, [result.steps] * len(requests)

        stored, raw_update, norms[layer] = commit(session, layer, result.delta, timings)
        deltas[state.weight_name] = stored
        keys[layer] = readout.keys.cpu().float()
        if raw_update is not None:
            raw[layer] = raw_update
    return _Edit(deltas, keys, raw, norms, loss, steps, notes)


def modules_route(
    session: EditSession, requests: list[EditRequest], timings: dict[str, float]
) -> _Edit:
    """A method editing other modules than the MLP output (UltraEdit): one gradient
    pass for every edited (layer, module), then each module's own update, projected
    with SPHERE on that module's neurons. The method's state after the batch (its
    normalisers) is journaled with it and taken into the module states by
    ``EditSession._count``."""
    model, tok, layout = session.loaded.model, session.loaded.tokenizer, session.layout
    sites = [(layer, name) for layer in session.layers for name in session.modules]
    with _timed(timings, "keys"):
        keys, gradients, loss = session.method.capture(model, tok, layout, requests, sites)  # type: ignore[union-attr]
    deltas, norms, method_state = {}, {}, {}
    notes: list[str] = []
    for layer, name in sites:
        state = session.module_states[(layer, name)]
        # Rows are target tokens, not requests: the module is named instead.
        for what, values in (("key", keys[layer]), ("gradient", gradients[(layer, name)])):
            if not bool(torch.isfinite(values).all()):
                raise NumericalError(
                    f"the {what} at {state.weight_name} is NaN or Inf; the batch was "
                    "rejected and the model left unchanged"
                )
        with _timed(timings, "solve"), _solver_notes(notes):
            delta, after = session.method.update(  # type: ignore[union-attr]
                keys[layer], gradients[(layer, name)], state.cache.get("method_state")
            )
        method_state.update({f"{layer}.{name}.{k}": t for k, t in after.items()})
        deltas[state.weight_name], norm = commit_module(session, state, name, delta, timings)
        # The norm of the layer's change: of all its modules' updates together.
        norms[layer] = math.hypot(norms.get(layer, 0.0), norm)
    keys = {layer: k.float() for layer, k in keys.items()}
    steps = [1] * len(requests)
    return _Edit(deltas, keys, {}, norms, loss, steps, notes, method_state=method_state)


def commit_module(
    session: EditSession,
    state: LayerState,
    name: str,
    delta: torch.Tensor,
    timings: dict[str, float],
) -> tuple[torch.Tensor, float]:
    """``commit`` for module ``name`` of ``state``'s layer: SPHERE with that module's
    neurons (rows of its (out, in) weight) as the basis, then add it to the weight."""
    layout, layer = session.layout, state.layer
    with _timed(timings, "projection"):
        if session.transform is not None:
            current = layout.read_module_weight(layer, name).detach().cpu()
            delta = session.transform(delta, current=current, pre_edit=state.pre_edit)
    if not bool(torch.isfinite(delta).all()):
        raise NumericalError(
            f"the update of {state.weight_name} is not finite; "
            "the batch was rejected and the model left unchanged"
        )
    weight = layout.module(layer, name).weight
    stored = layout.to_storage_layout(delta).to(weight.device, weight.dtype).contiguous()
    with torch.no_grad():
        weight.add_(stored)
    return stored.clone(), float(delta.norm())


def spread(
    session: EditSession,
    requests: list[EditRequest],
    templates: list[str],
    result: VStarResult,
    timings: dict[str, float],
    notes: list[str],
) -> tuple[
    dict[str, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, float]
]:
    """MEMIT's schedule: layer by layer, recompute keys and the remaining residual at
    the last edited layer, and give this layer its share of it."""
    model, tok, layout = session.loaded.model, session.loaded.tokenizer, session.layout
    z_layer = session.layers[-1]
    deltas, keys, raw, norms = {}, {}, {}, {}
    after = session.transform_order == "after"
    dense: dict[int, torch.Tensor] = {}  # "after": each layer's ΔW, kept for the end
    before: dict[int, torch.Tensor] = {}  # "after": each layer's weight before it
    # The layers below the window do not change here: run them once for all reads.
    lower = LowerLayers(first=min(session.layers))
    bar = Progress("key passes", len(session.layers), enabled=session.progress)
    for i, layer in enumerate(session.layers):
        with _timed(timings, "keys"):
            readout = read_layer(
                model, tok, layout, layer, z_layer, requests, templates, lower=lower
            )
            _require_finite(readout.keys, requests, f"key at layer {layer}")
            remaining = (result.vectors - readout.z_out) / (len(session.layers) - i)
            residuals = residual_to_mlp_delta(layout, layer, readout.mlp_out, remaining)
            # The closed forms run on the CPU in float64, next to the layer state.
            layer_keys, residuals = readout.keys.cpu(), residuals.cpu()

        state = session.states[layer]
        with _timed(timings, "solve"):
            state.weight = layout.read_weight(layer).detach().cpu()
            try:
                with _solver_notes(notes):
                    delta = session.method.update(layer_keys, residuals, state)  # type: ignore
                    if finalizes(session.method) and not after:
                        delta = session.method.finalize(delta, state)  # type: ignore
            finally:
                state.weight = None

        keys[layer] = layer_keys.float()
        if after:
            # The later layers see this layer's dense update, as in the authors' code.
            before[layer] = snapshot_weights(layout, [layer])[layer]
            dense[layer] = delta
            _add_dense(layout, layer, delta)
        else:
            stored, raw_update, norms[layer] = commit(session, layer, delta, timings)
            deltas[state.weight_name] = stored
            if raw_update is not None:
                raw[layer] = raw_update
        fault_point("layer")
        bar.update(i + 1, f"layer {layer}")
    bar.close()
    for layer in dense:
        # Back to the weight before the dense update, then the transformed one.
        restore_weights(layout, {layer: before[layer]})
        state, delta = session.states[layer], dense[layer]
        if finalizes(session.method):
            state.weight = layout.read_weight(layer).detach().cpu()
            try:
                delta = session.method.finalize(delta, state)  # type: ignore[union-attr]
            finally:
                state.weight = None
        stored, raw_update, norms[layer] = commit(session, layer, delta, timings)
        deltas[state.weight_name] = stored
        if raw_update is not None:
            raw[layer] = raw_update
    return deltas, keys, raw, norms


def commit(
    session: EditSession, layer: int, delta: torch.Tensor, timings: dict[str, float]
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Project a method's ΔW (out, in) with SPHERE and add it to the weight; return
    what was added (storage layout), the raw update when the method restrains the sum
    of its updates, and the norm of the change.

    For such a method (PRUNE) the weight becomes W0 + SPHERE(restrain(Σ ΔW)), the
    projection taking its basis from W0, and the change is that minus the weight now;
    unless the method edits the raw sum (``edit_restrained`` False), when ΔW is added
    as it is and the restrained weight is only what
    :meth:`EditSession.evaluation_weights` shows.
    """
    layout, state = session.layout, session.states[layer]
    raw = None
    with _timed(timings, "projection"):
        current = layout.read_weight(layer).detach().cpu()
        if restrains(session.method):
            assert state.accumulated is not None
            raw = delta.double()
            if edits_restrained(session.method):
                wanted = session.method.restrain(state.accumulated + raw, state)  # type: ignore[union-attr]
                if session.transform is not None:
                    wanted = session.transform(
                        wanted, current=state.pre_edit, pre_edit=state.pre_edit
                    )
                delta = state.pre_edit.double() + wanted - current.double()
        elif session.transform is not None:
            delta = session.transform(delta, current=current, pre_edit=state.pre_edit)

    if not bool(torch.isfinite(delta).all()):
        raise NumericalError(
            f"the update of layer {layer} is not finite; "
            "the batch was rejected and the model left unchanged"
        )
    weight = layout.mlp_out(layer).weight
    stored = layout.to_storage_layout(delta).to(weight.device, weight.dtype).contiguous()
    with torch.no_grad():
        weight.add_(stored)
    return stored.clone(), raw, float(delta.norm())


def _add_dense(layout: Any, layer: int, delta: torch.Tensor) -> None:
    """Add ``delta`` (out, in) to the layer's weight as it is, for the layers after it to
    read; the schedule's end puts the weight back before the transformed update."""
    weight = layout.mlp_out(layer).weight
    with torch.no_grad():
        weight.add_(layout.to_storage_layout(delta).to(weight.device, weight.dtype))


@contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    """Add the seconds the block takes to ``timings[phase]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start


@contextmanager
def _solver_notes(notes: list[str]) -> Iterator[None]:
    """Collect the solver fallbacks of a method call into ``notes`` (and let them be
    reported as warnings as usual)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IllConditionedWarning)
        yield
    for warning in caught:
        if issubclass(warning.category, IllConditionedWarning):
            notes.append(str(warning.message))
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _require_finite(values: torch.Tensor, requests: Sequence[EditRequest], what: str) -> None:
    bad = (~torch.isfinite(values.reshape(len(requests), -1))).any(dim=1).nonzero().flatten()
    if len(bad):
        names = ", ".join(f"{int(i)} ({requests[int(i)].subject!r})" for i in bad[:5])
        raise NumericalError(
            f"{what} is NaN or Inf for request(s) {names}; the batch was rejected and the "
            "model left unchanged"
        )


def edited_modules(method: object, layout: Any) -> tuple[str, ...]:
    """The modules of each layer ``method`` edits: its ``modules_for(layout)``, else its
    ``modules``, else the MLP output projection."""
    if callable(getattr(method, "modules_for", None)):
        return tuple(method.modules_for(layout))  # type: ignore[attr-defined]
    return tuple(getattr(method, "modules", MLP_OUT))


def module_state(layout: Any, layer: int, name: str) -> LayerState:
    """The state of module ``name`` of ``layer``: no corpus statistics (a zero
    placeholder, as for the methods that read none), the keys of earlier edits."""
    weight = layout.read_module_weight(layer, name).detach()
    d_k = weight.shape[1]
    return LayerState(
        layer=layer,
        weight_name=layout.module_weight_name(layer, name),
        pre_edit=weight.clone().cpu(),
        second_moment=torch.zeros(0, 0, dtype=torch.float64),
        edited_keys=torch.zeros(d_k, d_k, dtype=torch.float64),
    )
