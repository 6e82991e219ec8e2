"""The edited model of a run directory, rebuilt from its journal alone.

:meth:`EditSession.load` rebuilds a whole session (it needs the method and the key
statistics, to go on editing); reading the model a run produced needs neither: the base
model plus every journaled ΔW, added in order, exactly as the session added them. Both
replay through :class:`.journal.Journal`; this module is a thin layer over it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..model.loading import LoadedModel
from . import journal as _journal
from .journal import Journal, restrained_weight, set_weights


def is_run_dir(path: str | Path) -> bool:
    return Journal(path).exists()


def snapshot_weights(loaded: LoadedModel, layers: Iterable[int]) -> dict[int, torch.Tensor]:
    """Copies of the MLP output weights of ``layers``: all a journal's batches change, so
    :func:`restore_weights` puts the model back exactly as it was."""
    return _journal.snapshot_weights(loaded.layout, layers)


def restore_weights(loaded: LoadedModel, stored: dict[int, torch.Tensor]) -> None:
    """Copy :func:`snapshot_weights`' tensors back into the model, bitwise."""
    _journal.restore_weights(loaded.layout, stored)


def batch_edit_counts(run_dir: str | Path, index: dict[str, Any]) -> list[int]:
    """The cumulative number of requests after each journaled batch (from the batches'
    request files): the edit counts at which the run's model can be rebuilt."""
    return Journal(run_dir).edit_counts(index)


def apply_run(
    loaded: LoadedModel, run_dir: str | Path, *, start: int = 0, stop: int | None = None
) -> dict[str, Any]:
    """Add the journal's batches ``start`` to ``stop`` (positions, default all of them) to
    ``loaded``'s weights, in order; return the journal's index. The weights must be the
    base model's plus the batches before ``start``, which lets a caller rebuild the run
    step by step. On any error the model is left as it was."""
    journal = Journal(run_dir)
    index = journal.index()
    journal.replay(loaded, index, start=start, stop=stop)
    return index


def load_run_model(
    run_dir: str | Path,
    *,
    model: str | LoadedModel | None = None,
    device: str | None = None,
    device_map: str | None = None,
) -> tuple[LoadedModel, dict[str, Any]]:
    """Load the run's base model onto ``device`` or over ``device_map`` (as
    :func:`~sphere_edit.model.loading.load_model`; ``model`` overrides the name in the
    journal: a folder or hub id, or an already loaded unedited model) and apply the run
    to it: the model the run is evaluated with (for PRUNE editing the raw sum, the
    restrained weights, :func:`evaluated_weights`)."""
    journal = Journal(run_dir)
    index = journal.index()
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        from ..model.loading import load_model

        loaded = load_model(model or index["model"], device=device, device_map=device_map)
    base = _journal.snapshot_weights(loaded.layout, index["layers"])
    replayed = journal.replay(loaded, index)
    if evaluates_restrained(index) and replayed:
        raw = [applied.raw for _, applied in replayed]
        set_weights(loaded.layout, evaluated_weights(loaded, index, base, raw))
    return loaded, index


def evaluates_restrained(index: dict[str, Any]) -> bool:
    """Whether the journal's live model differs from the one it is evaluated with: PRUNE
    editing the raw sum of its updates (journals from before the option edited the
    restrained model)."""
    method = index.get("method") or {}
    return method.get("method") == "prune" and method.get("edit_restrained", True) is False


def evaluated_weights(
    loaded: LoadedModel,
    index: dict[str, Any],
    base: dict[int, torch.Tensor],
    raw: list[dict[int, torch.Tensor]],
) -> dict[int, torch.Tensor]:
    """Each layer's W0 + SPHERE(restrain(Σ ΔW)) (out, in), from the base weights ``base``
    (storage layout, as :func:`snapshot_weights` gives them) and the raw updates of the
    batches, summed in order as the session sums them."""
    from ..methods import make_method
    from ..methods.base import LayerState
    from ..sphere.projection import SphereProjection

    options = {k: v for k, v in index["method"].items() if k != "method"}
    method = make_method(index["method"]["method"], **options)
    transform = SphereProjection(**index["transform"]) if index.get("transform") else None
    layout = loaded.layout
    weights = {}
    for layer in index["layers"]:
        pre_edit = layout.to_storage_layout(base[layer]).detach().cpu()
        accumulated = torch.zeros(pre_edit.shape, dtype=torch.float64)
        for batch in raw:
            accumulated += batch[layer].double()
        empty = torch.zeros(0, dtype=torch.float64)
        state = LayerState(
            layer=layer,
            weight_name=layout.mlp_out_weight_name(layer),
            pre_edit=pre_edit,
            second_moment=empty,
            edited_keys=empty,
            accumulated=accumulated,
        )
        weights[layer] = restrained_weight(method, transform, state)
    return weights
