"""Scoring the general-ability tasks: batched generation and log-likelihood choices."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from ...editing.text import target_token_ids
from ..scoring import greedy_token_ids, next_token_scores, score_targets
from .prompts import GSM8K_NEW_TOKENS, NQ_NEW_TOKENS, gsm8k_correct, parse_choice, span_match


def _generate(
    model, tokenizer, prompts, max_new_tokens, batch_size
) -> tuple[list[str], list[bool]]:
    ids = greedy_token_ids(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    return texts, [len(row) >= max_new_tokens for row in ids]


def loglik_choices(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    choices: Sequence[str],
    *,
    batch_size: int = 16,
) -> list[int]:
    """For every prompt, the index of the choice with the largest total log-probability of
    its tokens after the prompt (ties go to the earlier choice). All prompt × choice rows
    go through the same batched passes."""
    rows = [p for p in prompts for _ in choices]
    targets = [c for _ in prompts for c in choices]
    scores = score_targets(model, tokenizer, rows, targets, batch_size=batch_size)
    k = len(choices)
    return [
        _best_choice([scores[i * k + j].logprob for j in range(k)]) for i in range(len(prompts))
    ]


def _best_choice(values: Sequence[float]) -> int:
    """The index of the largest value; a tie goes to the earlier one."""
    return max(range(len(values)), key=lambda j: (values[j], -j))


def one_pass_choices(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    choices: Sequence[str],
    *,
    batch_size: int = 16,
    timings: dict[str, float] | None = None,
) -> tuple[list[str], list[int], list[int]]:
    """The one-token generation and the log-likelihood choice of every prompt, from one
    batched pass per group of prompts (:func:`.evaluate.next_token_scores`).

    Returns ``(texts, picks, fallback)``: ``texts[i]`` is the greedy token decoded as
    :func:`_generate` decodes one new token (empty at end of sequence), ``picks[i]`` what
    :func:`loglik_choices` picks, and ``fallback`` the indices of the prompts whose
    choice was scored by :func:`loglik_choices` itself (see below). A ``timings`` dict
    receives the seconds of the shared passes (``"shared"``, the answers' tokenisation
    included) and of the fallback's (``"fallback"``, 0 without one).
    """
    clock = time.perf_counter()
    answer_ids = [[target_token_ids(tokenizer, p, c) for c in choices] for p in prompts]
    one_token = [all(len(ids) == 1 for ids in row) for row in answer_ids]
    candidates = [
        [ids[0] for ids in row] if ok else [] for row, ok in zip(answer_ids, one_token, strict=True)
    ]
    scores = next_token_scores(model, tokenizer, prompts, candidates, batch_size=batch_size)
    texts = [tokenizer.decode(list(s.greedy), skip_special_tokens=True) for s in scores]
    picks = [_best_choice(s.logprobs) if s.logprobs else -1 for s in scores]
    shared = time.perf_counter() - clock
    # A choice of several tokens (after this prompt, tokenised in context as the
    # teacher-forced route does) is scored at positions after the prompt, which the
    # shared pass does not compute: such prompts fall back to the existing route,
    # loglik_choices, at the cost of its own passes. The answers are one token each for
    # SmolLM2's and Gemma's tokenizers; the tiny test tokenizer splits them.
    fallback = [i for i, ok in enumerate(one_token) if not ok]
    fallback_seconds = 0.0
    if fallback:
        clock = time.perf_counter()
        chosen = loglik_choices(
            model, tokenizer, [prompts[i] for i in fallback], choices, batch_size=batch_size
        )
        for i, pick in zip(fallback, chosen, strict=True):
            picks[i] = pick
        fallback_seconds = time.perf_counter() - clock
    if timings is not None:
        timings["shared"] = shared
        timings["fallback"] = fallback_seconds
    return texts, picks, fallback


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _score_generated_choice(
    model, tokenizer, examples, choices, batch_size, details
) -> dict[str, Any]:
    """One greedy token per prompt, mapped to a label through ``choices``."""
    clock = time.perf_counter()
    texts, _ = _generate(model, tokenizer, [e.prompt for e in examples], 1, batch_size)
    return _generated_choice_result(texts, examples, choices, time.perf_counter() - clock, details)


def _generated_choice_result(texts, examples, choices, seconds, details) -> dict[str, Any]:
    """The generated variant's result from the decoded one-token answers."""
    answers = [parse_choice(t, choices) for t in texts]
    valid = [a is not None for a in answers]
    correct = [a is not None and a == e.gold for a, e in zip(answers, examples, strict=True)]
    result: dict[str, Any] = {
        "accuracy": _ratio(sum(correct), sum(valid)),
        "accuracy_all": _ratio(sum(correct), len(examples)),
        "correct": sum(correct),
        "valid": sum(valid),
        "invalid": len(examples) - sum(valid),
        "n": len(examples),
        "max_new_tokens": 1,
        "seconds": seconds,
    }
    if details:
        result["items"] = [
            {"output": t, "answer": a, "gold": e.gold, "correct": c}
            for t, a, e, c in zip(texts, answers, examples, correct, strict=True)
        ]
    return result


def _score_loglik_choice(
    model, tokenizer, examples, choices, batch_size, details
) -> dict[str, Any]:
    """The two-way choice by log-likelihood; choice 0 means a true label."""
    clock = time.perf_counter()
    picks = loglik_choices(
        model, tokenizer, [e.prompt for e in examples], choices, batch_size=batch_size
    )
    return _loglik_choice_result(picks, examples, choices, time.perf_counter() - clock, details)


def _loglik_choice_result(picks, examples, choices, seconds, details) -> dict[str, Any]:
    """The log-likelihood variant's result from the picked choices."""
    answers = [p == 0 for p in picks]
    correct = [a == e.gold for a, e in zip(answers, examples, strict=True)]
    result: dict[str, Any] = {
        "accuracy": _ratio(sum(correct), len(examples)),
        "correct": sum(correct),
        "n": len(examples),
        "choices": list(choices),
        "seconds": seconds,
    }
    if details:
        result["items"] = [
            {"answer": a, "gold": e.gold, "correct": c}
            for a, e, c in zip(answers, examples, correct, strict=True)
        ]
    return result


def score_gsm8k(model, tokenizer, examples, *, batch_size=16, details=False) -> dict[str, Any]:
    clock = time.perf_counter()
    texts, truncated = _generate(
        model, tokenizer, [e.prompt for e in examples], GSM8K_NEW_TOKENS, batch_size
    )
    correct = [
        gsm8k_correct(t, e.gold, truncated=cut)
        for t, e, cut in zip(texts, examples, truncated, strict=True)
    ]
    golds = [str(e.gold) for e in examples]
    return _generated_result(texts, golds, correct, GSM8K_NEW_TOKENS, clock, details)


def score_nq(model, tokenizer, examples, *, batch_size=16, details=False) -> dict[str, Any]:
    clock = time.perf_counter()
    texts, _ = _generate(model, tokenizer, [e.prompt for e in examples], NQ_NEW_TOKENS, batch_size)
    correct = [span_match(t, e.gold) for t, e in zip(texts, examples, strict=True)]
    golds = [e.gold for e in examples]
    return _generated_result(texts, golds, correct, NQ_NEW_TOKENS, clock, details)


def _generated_result(
    texts: list[str],
    golds: list[Any],
    correct: list[bool],
    new_tokens: int,
    clock: float,
    details: bool,
) -> dict[str, Any]:
    """The result of a task scored on free generations (GSM8K, NQ)."""
    result: dict[str, Any] = {
        "accuracy": _ratio(sum(correct), len(texts)),
        "correct": sum(correct),
        "n": len(texts),
        "empty": sum(not t.strip() for t in texts),
        "max_new_tokens": new_tokens,
        "seconds": time.perf_counter() - clock,
    }
    if details:
        result["items"] = [
            {"output": t, "gold": g, "correct": c}
            for t, g, c in zip(texts, golds, correct, strict=True)
        ]
    return result


def score_binary(
    model, tokenizer, examples, *, task: str, batch_size=16, details=False, one_pass=True
) -> dict[str, Any]:
    """RTE or BoolQ, both ways: one generated token and the log-likelihood choice.

    With ``one_pass`` (the default) both variants come from the same forward passes
    (:func:`one_pass_choices`): one per batch of prompts, since both read only the last
    prompt position. The answers, their correctness and the accuracies are those of the
    two separate routes (``one_pass=False``: generation, then teacher-forced scoring),
    which stay as the reference.

    Timing, one-pass: the task's ``seconds`` is its wall time. Each variant's ``seconds``
    is the time of the passes its answers came from: ``generate`` the shared passes;
    ``loglik`` the shared passes too when some of its choices came from them, plus the
    passes of the prompts whose choices were several tokens long (``multi_token_items``,
    scored by the separate route; none with SmolLM2's and Gemma's tokenizers). A variant
    whose ``seconds`` hold the shared passes says ``"shared_pass": true``: the two
    variants' ``seconds`` then overlap and are not to be added up. With ``one_pass=False``
    each variant's ``seconds`` is its own route's and the task has no ``seconds``.
    """
    from .tasks import TASK_TABLE  # the table names this scorer, so it is imported late

    words, choices = TASK_TABLE[task].words, TASK_TABLE[task].choices
    if not one_pass:
        return {
            "generate": _score_generated_choice(
                model, tokenizer, examples, words, batch_size, details
            ),
            "loglik": _score_loglik_choice(
                model, tokenizer, examples, choices, batch_size, details
            ),
            "n": len(examples),
        }
    clock = time.perf_counter()
    prompts = [e.prompt for e in examples]
    timings: dict[str, float] = {}
    texts, picks, fallback = one_pass_choices(
        model, tokenizer, prompts, choices, batch_size=batch_size, timings=timings
    )
    shared = timings["shared"]
    used_shared = len(fallback) < len(examples)  # some choices came from the shared passes
    loglik_seconds = (shared if used_shared else 0.0) + timings["fallback"]
    generate = _generated_choice_result(texts, examples, words, shared, details)
    loglik = _loglik_choice_result(picks, examples, choices, loglik_seconds, details)
    generate["shared_pass"], loglik["shared_pass"] = True, used_shared
    loglik["multi_token_items"] = len(fallback)
    return {
        "generate": generate,
        "loglik": loglik,
        "n": len(examples),
        "one_pass": True,
        "seconds": time.perf_counter() - clock,
    }
