"""Fluency and consistency of a benchmark run's model, measured after the run.

The benchmark generates text (fluency: n-gram entropy; consistency: TF-IDF similarity to
the reference texts) only for its first ``fluency_cases`` cases, on the pre-edit and the
final model. A run started without them (the collapse study's) has no Flu and cannot gain
it on resume: its pre-edit results are shared with other runs through ``--pre-edit-from``,
which compares that setting. :func:`measure_fluency` measures it afterwards as the
benchmark would have: the run's cases rebuilt from its ``config.json`` (dataset, count,
offset, case order), the model the method's journal gives (``load_run_model``: PRUNE with
its restrained weights, as the benchmark scores it), the run's seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..editing.runs import load_run_model
from ..evaluation.data import load_cases
from ..evaluation.metrics import aggregate, evaluate_generation
from ..model.loading import LoadedModel, load_model
from .config import order_cases
from .rundir import BenchRunDir


def measure_fluency(
    run_dir: str | Path,
    method: str,
    *,
    cases: int = 100,
    base: bool = False,
    model: LoadedModel | None = None,
) -> dict[str, Any]:
    """Fluency and consistency of the first ``cases`` cases of the benchmark run at
    ``run_dir``, on ``method``'s model after the batches its journal holds (or, with
    ``base``, on the unedited model). ``model``: the unedited model already loaded (else
    the run's model is loaded)."""
    if cases < 1:
        raise ValueError(f"cases: {cases} is below 1; give at least 1")
    run = BenchRunDir(run_dir)
    try:
        stored = run.read_config()["config"]
    except FileNotFoundError:
        raise ValueError(f"run_dir: {run_dir} is not a benchmark run (no config.json)") from None
    if method not in stored["methods"]:
        known = ", ".join(stored["methods"])
        raise ValueError(f"method: {method!r} is not one of this run's ({known})")
    folder = run.method(method)
    if not base and not folder.has_journal:
        raise ValueError(f"method: {folder.journal} holds no journal yet")
    case_set = load_cases(stored["dataset"], limit=stored["n_edits"], offset=stored["offset"],
                          skip_invalid=stored["skip_invalid"])  # fmt: skip
    chosen = order_cases(list(case_set), stored["case_order"])[:cases]
    batches = 0
    if base:
        loaded = model or load_model(stored["model"])
    else:
        loaded, index = load_run_model(folder.journal, model=model)
        batches = len(index["batches"])
    generated = evaluate_generation(loaded.model, loaded.tokenizer, chosen, seed=stored["seed"])
    metrics = aggregate(generated)
    return {
        "method": "base model" if base else method,
        "batches": batches,
        "edits": min(batches * stored["batch_size"], stored["n_edits"]),
        "cases": len(chosen),
        "fluency": metrics.get("fluency"),
        "consistency": metrics.get("consistency"),
    }
