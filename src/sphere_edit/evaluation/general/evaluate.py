"""Zero-shot general abilities of a model on the tasks of :data:`.tasks.TASK_TABLE`."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from .loaders import DEFAULT_N_ITEMS, resolve_data_dir
from .prompts import GeneralDataError
from .tasks import TASK_TABLE, TASKS, task_list


def _summary(tasks: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, result in tasks.items():
        if "generate" in result:
            flat[f"{name}_generate_acc"] = result["generate"]["accuracy"]
            flat[f"{name}_generate_acc_all"] = result["generate"]["accuracy_all"]
            flat[f"{name}_generate_invalid"] = result["generate"]["invalid"]
            flat[f"{name}_loglik_acc"] = result["loglik"]["accuracy"]
        else:
            flat[f"{name}_acc"] = result["accuracy"]
    return flat


def evaluate_general(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data_dir: str | Path | None = None,
    n_items: int = DEFAULT_N_ITEMS,
    tasks: Sequence[str] = TASKS,
    batch_size: int = 16,
    *,
    paths: Mapping[str, str | Path] | None = None,
    details: bool = False,
    log: Callable[[str], None] | None = None,
    one_pass: bool = True,
) -> dict[str, Any]:
    """Zero-shot general abilities of ``model`` on the first ``n_items`` of each task.

    ``data_dir`` holds the RECT files (or a ``general/`` folder with them; default
    ``$SPHERE_EDIT_DATA``); ``paths`` names a file per task instead. Returns a
    JSON-serialisable dict: ``tasks`` (full results per task, timing included),
    ``summary`` (flat accuracies: ``gsm8k_acc``, ``rte_generate_acc``, ``rte_loglik_acc``,
    ``nq_acc``, ``boolq_generate_acc``, ``boolq_loglik_acc``, invalid counts), ``n_items``,
    ``files`` and ``seconds``. GSM8K and NQ also count ``empty`` generations (the model
    ended at once). With ``details`` every item's output is kept too. RTE and BoolQ take
    both their answers from the same passes unless ``one_pass`` is false (the separate
    routes, the reference; see :func:`score_binary`, also for what their ``seconds`` mean).
    """
    tasks = task_list(tasks)
    if n_items < 1:
        raise ValueError(f"n_items must be at least 1, got {n_items}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    paths = dict(paths or {})
    files: dict[str, Path] = {}
    for task in tasks:
        if task in paths:
            files[task] = Path(paths[task])
        else:
            files[task] = resolve_data_dir(data_dir) / TASK_TABLE[task].file
        if not files[task].is_file():
            raise GeneralDataError(f"{task}: data file {files[task]} does not exist")
    start = time.perf_counter()
    results: dict[str, Any] = {}
    was_training = model.training
    model.eval()
    try:
        for task in tasks:
            examples = TASK_TABLE[task].load(files[task], n_items)
            if not examples:
                raise GeneralDataError(f"{task}: {files[task]} holds no items")
            if log:
                log(f"{task}: {len(examples)} items")
            result = TASK_TABLE[task].score(
                model, tokenizer, examples, batch_size=batch_size, details=details,
                one_pass=one_pass,
            )  # fmt: skip
            results[task] = result
    finally:
        model.train(was_training)
    return {
        "tasks": results,
        "summary": _summary(results),
        "n_items": n_items,
        "files": {task: str(path) for task, path in files.items()},
        "seconds": time.perf_counter() - start,
    }
