"""The edited model of a run directory, rebuilt from its journal alone.

:meth:`EditSession.load` rebuilds a whole session (it needs the method and the key
statistics, to go on editing); reading the model a run produced needs neither: the base
model plus every journaled ΔW, added in order, exactly as the session added them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..model.loading import LoadedModel
from .journal import INDEX, JournalError, read_batch, read_index, require_base


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def snapshot_weights(loaded: LoadedModel, layers: Iterable[int]) -> dict[int, torch.Tensor]:
    """Copies of the MLP output weights of ``layers``: all a journal's batches change, so
    :func:`restore_weights` puts the model back exactly as it was."""
    return {layer: loaded.layout.mlp_out(layer).weight.detach().clone() for layer in layers}


def restore_weights(loaded: LoadedModel, stored: dict[int, torch.Tensor]) -> None:
    """Copy :func:`snapshot_weights`' tensors back into the model, bitwise."""
    with torch.no_grad():
        for layer, weight in stored.items():
            loaded.layout.mlp_out(layer).weight.copy_(weight)


def batch_edit_counts(run_dir: str | Path, index: dict[str, Any]) -> list[int]:
    """The cumulative number of requests after each journaled batch (from the batches'
    request files): the edit counts at which the run's model can be rebuilt."""
    run_dir = Path(run_dir)
    counts, total = [], 0
    for entry in index["batches"]:
        path = run_dir / entry["requests_file"]
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise JournalError(f"batch {entry['index']}: {path} cannot be read ({error})") from None
        total += len(record["requests"])
        counts.append(total)
    return counts


def apply_run(
    loaded: LoadedModel, run_dir: str | Path, *, start: int = 0, stop: int | None = None
) -> dict[str, Any]:
    """Add the journal's batches ``start`` to ``stop`` (positions, default all of them) to
    ``loaded``'s weights, in order; return the journal's index. The weights must be the
    base model's plus the batches before ``start``, which lets a caller rebuild the run
    step by step. On any error the model is left as it was."""
    run_dir = Path(run_dir)
    index = read_index(run_dir)
    require_base(run_dir, index, loaded.fingerprint)
    layout = loaded.layout
    names = {layout.mlp_out_weight_name(layer): layer for layer in index["layers"]}
    params = {name: layout.mlp_out(layer).weight for name, layer in names.items()}
    backup = snapshot_weights(loaded, index["layers"])
    try:
        with torch.no_grad():
            for entry in index["batches"][start:stop]:
                deltas = read_batch(run_dir, entry, base=index["base_fingerprint"])[0]
                for name, delta in deltas.items():
                    if name not in params:
                        raise JournalError(
                            f"batch {entry['index']} edits {name}, which is not an edited "
                            "layer of this run"
                        )
                    weight = params[name]
                    if weight.shape != delta.shape:
                        raise JournalError(
                            f"{name}: journal delta has shape {tuple(delta.shape)}, the "
                            f"model's weight {tuple(weight.shape)}"
                        )
                    weight.add_(delta.to(weight.device, weight.dtype))
    except BaseException:
        restore_weights(loaded, backup)
        raise
    return index


def load_run_model(
    run_dir: str | Path, *, model: str | LoadedModel | None = None, device: str = "cpu"
) -> tuple[LoadedModel, dict[str, Any]]:
    """Load the run's base model onto ``device`` (``model`` overrides the name in the
    journal: a folder or hub id, or an already loaded unedited model) and apply the run
    to it."""
    run_dir = Path(run_dir)
    index = read_index(run_dir)
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        from ..model.loading import load_model

        loaded = load_model(model or index["model"], device=device)
    apply_run(loaded, run_dir)
    return loaded, index
