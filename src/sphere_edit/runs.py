"""The edited model of a run directory, rebuilt from its journal alone.

:meth:`EditSession.load` rebuilds a whole session (it needs the method and the key
statistics, to go on editing); reading the model a run produced needs neither: the base
model plus every journaled ΔW, added in order, exactly as the session added them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .journal import INDEX, JournalError, read_batch, read_index, require_base
from .models import LoadedModel


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def apply_run(loaded: LoadedModel, run_dir: str | Path) -> dict[str, Any]:
    """Add every batch of the journal in ``run_dir`` to ``loaded``'s (unedited) weights, in
    order; return the journal's index. On any error the model is left unedited."""
    run_dir = Path(run_dir)
    index = read_index(run_dir)
    require_base(run_dir, index, loaded.fingerprint)
    layout = loaded.layout
    names = {layout.mlp_out_weight_name(layer): layer for layer in index["layers"]}
    params = {name: layout.mlp_out(layer).weight for name, layer in names.items()}
    backup = {name: p.detach().clone() for name, p in params.items()}
    try:
        with torch.no_grad():
            for entry in index["batches"]:
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
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(backup[name])
        raise
    return index


def load_run_model(
    run_dir: str | Path, *, model: str | LoadedModel | None = None
) -> tuple[LoadedModel, dict[str, Any]]:
    """Load the run's base model (``model`` overrides the name in the journal: a folder
    or hub id, or an already loaded unedited model) and apply the run to it."""
    run_dir = Path(run_dir)
    index = read_index(run_dir)
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        from .models import load_model

        loaded = load_model(model or index["model"])
    apply_run(loaded, run_dir)
    return loaded, index
