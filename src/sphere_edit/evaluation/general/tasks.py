"""The table of general-ability tasks: each declared once, so adding a task is one entry.

A :class:`GeneralTask` names the RECT file a task reads, its loader (file → prompts and
gold answers, through the task's prompt builder), the parser that judges a model's answer
and the scorer that runs the model. :func:`.evaluate.evaluate_general` and the CLI take
everything they need about a task from :data:`TASK_TABLE`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from .loaders import Example, load_boolq, load_gsm8k, load_nq, load_rte
from .prompts import (
    BOOLQ_CHOICES,
    RTE_CHOICES,
    TRUE_FALSE,
    YES_NO,
    boolq_prompt,
    gsm8k_correct,
    gsm8k_prompt,
    nq_prompt,
    parse_choice,
    rte_prompt,
    span_match,
)
from .scoring import score_binary, score_gsm8k, score_nq

# A scorer's call: (model, tokenizer, examples, *, batch_size, details, one_pass) → result.
Scorer = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class GeneralTask:
    """One general-ability task.

    ``file`` is the RECT file name in the data folder; ``load(path, n_items)`` reads the
    first ``n_items`` as :class:`.Example` s with prompts from ``prompt``; ``parse`` is the
    answer parser the scorer judges outputs with; ``score`` runs the model (called as
    ``score(model, tokenizer, examples, batch_size=..., details=..., one_pass=...)``).
    A two-way task also names its one-token ``words`` (the label each generated word
    means) and its log-likelihood ``choices`` (the first meaning a true label).
    """

    name: str
    file: str
    load: Callable[[str | Path, int], list[Example]]
    prompt: Callable[..., str]
    parse: Callable[..., Any]
    score: Scorer
    words: Mapping[str, bool] | None = None
    choices: tuple[str, ...] = ()


def _generative(
    scorer: Callable[..., dict[str, Any]],
) -> Scorer:
    """A free-generation scorer (one route only) called as the table calls scorers."""

    def score(
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        examples: Sequence[Example],
        *,
        batch_size: int,
        details: bool,
        one_pass: bool,
    ) -> dict[str, Any]:
        del one_pass  # only the two-way tasks have a second route to share passes with
        return scorer(model, tokenizer, examples, batch_size=batch_size, details=details)

    return score


def _binary(task: str) -> Scorer:
    """The two-way scorer of ``task`` called as the table calls scorers."""

    def score(
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        examples: Sequence[Example],
        *,
        batch_size: int,
        details: bool,
        one_pass: bool,
    ) -> dict[str, Any]:
        return score_binary(
            model, tokenizer, examples, task=task, batch_size=batch_size,
            details=details, one_pass=one_pass,
        )  # fmt: skip

    return score


TASK_TABLE: dict[str, GeneralTask] = {
    task.name: task
    for task in (
        GeneralTask(
            "gsm8k",
            "test-reasoning.jsonl",
            load_gsm8k,
            gsm8k_prompt,
            gsm8k_correct,
            _generative(score_gsm8k),
        ),
        GeneralTask(
            "rte",
            "test-NLI.tsv",
            load_rte,
            rte_prompt,
            parse_choice,
            _binary("rte"),
            words=TRUE_FALSE,
            choices=RTE_CHOICES,
        ),
        GeneralTask(
            "nq",
            "test-OpenDomainQA.jsonl",
            load_nq,
            nq_prompt,
            span_match,
            _generative(score_nq),
        ),
        GeneralTask(
            "boolq",
            "test-ClosedDomainQA.jsonl",
            load_boolq,
            boolq_prompt,
            parse_choice,
            _binary("boolq"),
            words=YES_NO,
            choices=BOOLQ_CHOICES,
        ),
    )
}
# The task names in the table's order, and per-name views of it kept for existing callers.
TASKS: tuple[str, ...] = tuple(TASK_TABLE)
TASK_FILES: dict[str, str] = {name: task.file for name, task in TASK_TABLE.items()}
LOADERS: dict[str, Callable[[str | Path, int], list[Example]]] = {
    name: task.load for name, task in TASK_TABLE.items()
}


def task_list(tasks: str | Sequence[str]) -> list[str]:
    """``"rte,boolq"`` or a sequence of names as a checked list of task names."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASK_TABLE]
    if unknown or not tasks:
        raise ValueError(
            f"tasks: unknown {unknown or tasks!r}; choose from {', '.join(TASK_TABLE)}"
        )
    return list(tasks)
