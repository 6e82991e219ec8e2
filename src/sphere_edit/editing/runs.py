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
from .journal import Journal


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
    run_dir: str | Path, *, model: str | LoadedModel | None = None, device: str = "cpu"
) -> tuple[LoadedModel, dict[str, Any]]:
    """Load the run's base model onto ``device`` (``model`` overrides the name in the
    journal: a folder or hub id, or an already loaded unedited model) and apply the run
    to it."""
    journal = Journal(run_dir)
    index = journal.index()
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        from ..model.loading import load_model

        loaded = load_model(model or index["model"], device=device)
    journal.replay(loaded, index)
    return loaded, index
