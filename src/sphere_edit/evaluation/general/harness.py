"""Evaluating an in-memory model with lm-evaluation-harness."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from ...model.placement import input_device


def lm_eval_evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str | Mapping[str, Any]],
    *,
    include_path: str | Path | Sequence[str | Path] | None = None,
    include_defaults: bool = True,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate an in-memory (e.g. edited) model with lm-evaluation-harness.

    ``tasks`` are harness task names (or task config dicts); ``include_path`` adds folders
    of local task YAMLs, and ``include_defaults=False`` skips indexing the harness's own
    tasks (faster when only local tasks are used). Other keyword arguments go to
    ``lm_eval.simple_evaluate``. Returns the JSON-serialisable part of its result:
    ``results`` (metrics per task), ``versions``, ``n-samples``, ``higher_is_better``.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(
            f"lm_eval_evaluate needs lm-evaluation-harness: pip install 'lm-eval>=0.4' ({error})"
        ) from None
    if isinstance(tasks, str):
        tasks = [tasks]
    if isinstance(include_path, (str, Path)):
        include_path = [include_path]
    manager = TaskManager(
        include_path=[str(p) for p in include_path] if include_path else None,
        include_defaults=include_defaults,
    )
    device = input_device(model)
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=max_length,
        device=str(device),
    )
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        **kwargs,
    )
    if output is None:  # only on non-zero ranks of a distributed run
        return {}
    kept = {
        key: output.get(key) for key in ("results", "versions", "n-samples", "higher_is_better")
    }
    return json.loads(json.dumps(kept, default=_jsonable))


def _jsonable(value: Any) -> Any:
    """numpy scalars as numbers, anything else json cannot write as text."""
    if hasattr(value, "item"):
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    return str(value)
