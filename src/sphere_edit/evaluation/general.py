"""General abilities after editing: zero-shot GSM8K, RTE, Natural Questions and BoolQ.

The prompts and scoring follow the evaluation protocol of RECT (Gu et al. 2024), which
SPHERE reuses:

* GSM8K (reasoning): ``Q: {question} A: Let's think step by step. {rationale} Therefore,
  the answer (arabic numerals) is:`` where the rationale is the gold solution before
  ``####`` (verbatim, calculator annotations included). The model continues greedily for
  :data:`GSM8K_NEW_TOKENS` tokens; the item is correct when a number in that continuation
  equals the gold number (``1,000``, ``1000`` and ``1000.0`` are the same number).
* RTE (NLI): ``{sentence1} entails {sentence2}. True or False? answer:``; one greedy
  token, ``True`` meaning entailment.
* NQ (open-domain QA, with its supporting passage): up to :data:`NQ_NEW_TOKENS` greedy
  tokens; correct when a gold answer, normalised, is a contiguous run of words of the
  normalised generation.
* BoolQ (closed-domain QA): one greedy token, ``yes`` or ``no``.

A one-token answer that is neither choice is *invalid*: accuracy is reported over the
valid answers (the protocol's figure) and over all items, with the invalid count. Small
models rarely produce a valid first token at all, so RTE and BoolQ are also scored by
log-likelihood: the answer whose tokens have the larger total log-probability after the
prompt (``" True"``/``" False"``, ``" yes"``/``" no"``) is the model's answer.

Everything is batched: generation with left padding and the key/value cache
(:func:`.evaluate.greedy_token_ids`), log-likelihoods with
:func:`.evaluate.score_targets`. RTE and BoolQ need only the logits at the last prompt
position for both of their answers (one generated token; one-token choices), so both
come from one pass per batch of prompts (:func:`.evaluate.next_token_scores`, see
:func:`score_binary`); the two separate routes remain as the reference.

The data are the RECT files (``test-reasoning.jsonl``, ``test-NLI.tsv``,
``test-OpenDomainQA.jsonl``, ``test-ClosedDomainQA.jsonl``), read from a folder; the first
``n_items`` of each are used.
"""

from __future__ import annotations

import csv
import json
import os
import re
import string
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from ..editing.text import target_token_ids
from .scoring import greedy_token_ids, next_token_scores, score_targets

TASKS: tuple[str, ...] = ("gsm8k", "rte", "nq", "boolq")
TASK_FILES: dict[str, str] = {
    "gsm8k": "test-reasoning.jsonl",
    "rte": "test-NLI.tsv",
    "nq": "test-OpenDomainQA.jsonl",
    "boolq": "test-ClosedDomainQA.jsonl",
}
DATA_ENV = "SPHERE_EDIT_DATA"
DEFAULT_N_ITEMS = 200
# Ten tokens: SmolLM2's and Gemma's tokenizers write one digit per token, so a
# six-figure answer with its thousands separator ("100,000") and the space before it
# already takes eight.
GSM8K_NEW_TOKENS = 10
NQ_NEW_TOKENS = 20
RTE_CHOICES = (" True", " False")
BOOLQ_CHOICES = (" yes", " no")


class GeneralDataError(ValueError):
    """A general-ability data file is missing or not in the expected format."""


# -- prompts ---------------------------------------------------------------------------------


def gsm8k_rationale(answer: str) -> str:
    """The gold solution text before ``####``."""
    return answer.split("####", 1)[0].strip()


def gsm8k_gold(answer: str) -> Decimal:
    """The gold number after ``####`` (thousands separators removed)."""
    if "####" not in answer:
        raise GeneralDataError(f"GSM8K answer has no '####': {answer[-60:]!r}")
    numbers = extract_numbers(answer.rsplit("####", 1)[1])
    if not numbers:
        raise GeneralDataError(f"GSM8K answer has no number after '####': {answer[-60:]!r}")
    return numbers[0]


def gsm8k_prompt(question: str, answer: str) -> str:
    return (
        f"Q: {question} A: Let's think step by step. {gsm8k_rationale(answer)} "
        "Therefore, the answer (arabic numerals) is:"
    )


def rte_prompt(sentence1: str, sentence2: str) -> str:
    return f"{sentence1} entails {sentence2}. True or False? answer:"


def nq_prompt(question: str, passage: str) -> str:
    return (
        "Refer to the passage below and answer the following question.\n"
        f"Passage: {passage}\nQuestion: {question}\nAnswer:"
    )


def boolq_prompt(question: str, passage: str) -> str:
    return (
        "Please answer the given question based on the passage. The answer should be "
        f"exact 'yes' or 'no'. passage: {passage} question: {question}. answer:"
    )


# -- answer parsing --------------------------------------------------------------------------

# A number not glued to a word or a decimal point: thousands groups only when every group
# has three digits ("1,000,000"), else plain digits; an optional decimal part.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def extract_numbers(text: str) -> list[Decimal]:
    """Every number in ``text``, in order: ``"$1,000.50 and -3"`` → ``[1000.50, -3]``."""
    return [Decimal(match.group().replace(",", "")) for match in _NUMBER.finditer(text)]


def gsm8k_correct(generated: str, gold: Decimal, *, truncated: bool = False) -> bool:
    """Whether a number of ``generated`` equals ``gold``. With ``truncated`` (the
    generation stopped at the token limit) a number running into the end of the text may
    be cut short, so it does not count."""
    text = generated
    if truncated and text and text[-1].isdigit():
        cut = _NUMBER.search(text[::-1])
        text = text[: len(text) - cut.end()] if cut else text
    return any(number == gold for number in extract_numbers(text))


_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style: lower-case, drop punctuation, drop the articles a/an/the, collapse
    whitespace."""
    text = text.lower()
    text = "".join(
        ch for ch in text if ch not in _PUNCTUATION and not unicodedata.category(ch).startswith("P")
    )
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def span_match(generated: str, golds: Sequence[str]) -> bool:
    """Whether some gold answer, normalised, is a contiguous run of words of the
    normalised generation (a gold answer that normalises to nothing never matches)."""
    words = normalize_answer(generated).split()
    for gold in golds:
        wanted = normalize_answer(gold).split()
        if not wanted:
            continue
        for begin in range(len(words) - len(wanted) + 1):
            if words[begin : begin + len(wanted)] == wanted:
                return True
    return False


def parse_choice(text: str, choices: Mapping[str, bool]) -> bool | None:
    """Map a one-token answer to a label: surrounding whitespace and punctuation are
    dropped, case ignored; ``None`` when it is none of ``choices``."""
    word = text.strip().strip(string.punctuation + " \t\n").lower()
    return choices.get(word)


TRUE_FALSE = {"true": True, "false": False}
YES_NO = {"yes": True, "no": False}


# -- data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One item: its prompt and its gold answer (a number for GSM8K, a label for RTE and
    BoolQ, a list of acceptable strings for NQ)."""

    prompt: str
    gold: Any


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The folder of the general-ability files: ``data_dir`` itself or its ``general/``
    subfolder; by default ``$SPHERE_EDIT_DATA/general``."""
    if data_dir is None:
        value = os.environ.get(DATA_ENV)
        if not value:
            raise GeneralDataError(
                f"no data folder: pass one (--data) or set {DATA_ENV} to the folder "
                "holding general/"
            )
        data_dir = value
    path = Path(data_dir)
    if (path / "general").is_dir():
        path = path / "general"
    if not path.is_dir():
        raise GeneralDataError(f"data folder {path} does not exist")
    return path


def _jsonl(path: Path, n_items: int) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if len(records) >= n_items:
                break
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise GeneralDataError(f"{path}:{number}: not JSON ({error})") from None
    return records


def _field(record: Mapping[str, Any], name: str, path: Path, number: int) -> Any:
    if name not in record:
        raise GeneralDataError(
            f"{path}: record {number} has no field {name!r} (fields: {', '.join(record)})"
        )
    return record[name]


def load_gsm8k(path: str | Path, n_items: int = DEFAULT_N_ITEMS) -> list[Example]:
    path = Path(path)
    examples = []
    for i, record in enumerate(_jsonl(path, n_items), 1):
        question, answer = _field(record, "question", path, i), _field(record, "answer", path, i)
        examples.append(Example(gsm8k_prompt(question, answer), gsm8k_gold(answer)))
    return examples


def load_rte(path: str | Path, n_items: int = DEFAULT_N_ITEMS) -> list[Example]:
    path = Path(path)
    labels = {"entailment": True, "not_entailment": False}
    examples = []
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        for i, record in enumerate(reader, 1):
            if len(examples) >= n_items:
                break
            label = _field(record, "label", path, i)
            if label not in labels:
                raise GeneralDataError(f"{path}: record {i} has label {label!r}")
            s1, s2 = _field(record, "sentence1", path, i), _field(record, "sentence2", path, i)
            examples.append(Example(rte_prompt(s1, s2), labels[label]))
    return examples


def load_nq(path: str | Path, n_items: int = DEFAULT_N_ITEMS) -> list[Example]:
    path = Path(path)
    examples = []
    for i, record in enumerate(_jsonl(path, n_items), 1):
        answers = _field(record, "answer", path, i)
        output = _field(record, "output", path, i)
        passage = output[0] if isinstance(output, list) and output else output
        if not isinstance(passage, str):
            raise GeneralDataError(f"{path}: record {i} has no passage in 'output'")
        golds = [answers] if isinstance(answers, str) else [str(a) for a in answers]
        examples.append(
            Example(nq_prompt(_field(record, "question", path, i), passage.strip()), golds)
        )
    return examples


def load_boolq(path: str | Path, n_items: int = DEFAULT_N_ITEMS) -> list[Example]:
    path = Path(path)
    examples = []
    for i, record in enumerate(_jsonl(path, n_items), 1):
        answer = _field(record, "answer", path, i)
        if isinstance(answer, str) and answer.lower() in ("true", "false"):
            answer = answer.lower() == "true"
        if not isinstance(answer, bool):
            raise GeneralDataError(f"{path}: record {i} has answer {answer!r}, not true/false")
        prompt = boolq_prompt(
            _field(record, "question", path, i), _field(record, "passage", path, i)
        )
        examples.append(Example(prompt, answer))
    return examples


LOADERS: dict[str, Callable[[str | Path, int], list[Example]]] = {
    "gsm8k": load_gsm8k,
    "rte": load_rte,
    "nq": load_nq,
    "boolq": load_boolq,
}


# -- scoring ---------------------------------------------------------------------------------


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
    words, choices = (TRUE_FALSE, RTE_CHOICES) if task == "rte" else (YES_NO, BOOLQ_CHOICES)
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


def task_list(tasks: str | Sequence[str]) -> list[str]:
    """``"rte,boolq"`` or a sequence of names as a checked list of task names."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks: unknown {unknown or tasks!r}; choose from {', '.join(TASKS)}")
    return list(tasks)


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
            files[task] = resolve_data_dir(data_dir) / TASK_FILES[task]
        if not files[task].is_file():
            raise GeneralDataError(f"{task}: data file {files[task]} does not exist")
    start = time.perf_counter()
    results: dict[str, Any] = {}
    was_training = model.training
    model.eval()
    try:
        for task in tasks:
            examples = LOADERS[task](files[task], n_items)
            if not examples:
                raise GeneralDataError(f"{task}: {files[task]} holds no items")
            if log:
                log(f"{task}: {len(examples)} items")
            if task == "gsm8k":
                result = score_gsm8k(
                    model, tokenizer, examples, batch_size=batch_size, details=details
                )
            elif task == "nq":
                result = score_nq(
                    model, tokenizer, examples, batch_size=batch_size, details=details
                )
            else:
                result = score_binary(
                    model, tokenizer, examples, task=task, batch_size=batch_size,
                    details=details, one_pass=one_pass,
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


# -- curves over a run's edits ----------------------------------------------------------------


def accuracy_keys(summaries: Iterable[Mapping[str, Any]]) -> list[str]:
    """The accuracies among the summaries' keys (not the counts), in first-seen order:
    the columns of a general-ability curve, in its plot and its table alike."""
    keys: dict[str, None] = {}
    for summary in summaries:
        keys.update((key, None) for key in summary if key.endswith("_acc"))
    return list(keys)


def general_curve(
    run_dir: str | Path,
    edits: Sequence[int],
    *,
    model: Any = None,
    device: str = "cpu",
    data_dir: str | Path | None = None,
    n_items: int = DEFAULT_N_ITEMS,
    tasks: str | Sequence[str] = TASKS,
    batch_size: int = 16,
    out: str | Path | None = None,
    details: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """General abilities of a run's model after its first K edits, for each K in
    ``edits`` (0 = the base model; every K a batch end): the benchmark's
    ``--general-every`` curve, measured afterwards from the journal, since evaluating
    inside the benchmark is too slow on a CPU.

    One model is edited step by step (the batches up to the next K are added, then it is
    evaluated), never reloaded. Returns ``{"run_dir", "model", "method", "n_items",
    "tasks", "points"}``, a point being ``{"edits", "batches", **evaluate_general(...)}``.
    With ``out`` the curve is written atomically after every point, and the points
    ``out`` already holds for the same run, items and tasks are kept and not measured
    again, so an interrupted job goes on where it stopped. ``model`` is the base model as in
    :func:`.geometry.geometry_for_run` (loaded onto ``device`` when it is a name); a passed
    :class:`.LoadedModel` gets its weights back.
    """
    from ..common.fileio import write_json
    from ..editing.journal import Journal, restore_weights, snapshot_weights
    from ..model.loading import LoadedModel, load_model

    run_dir = Path(run_dir)
    journal = Journal(run_dir)
    index = journal.index()
    reachable = [0, *journal.edit_counts(index)]
    wanted = sorted(set(edits))
    unreachable = [k for k in wanted if k not in reachable]
    if unreachable or not wanted:
        problem = f"{', '.join(map(str, unreachable))} not at a batch end" if wanted else "empty"
        raise ValueError(
            f"--edits: {problem}; the edit counts {run_dir} can be rebuilt at are "
            f"{', '.join(map(str, reachable))}"
        )
    name = model.name if isinstance(model, LoadedModel) else model or index["model"]
    curve: dict[str, Any] = {
        "run_dir": str(run_dir), "model": name, "method": index.get("method_spec"),
        "n_items": n_items, "tasks": task_list(tasks), "points": [],
    }  # fmt: skip
    if out is not None and Path(out).exists():
        curve["points"] = _stored_points(Path(out), curve)
    done = {point["edits"] for point in curve["points"]}
    todo = [k for k in wanted if k not in done]
    if not todo:
        return curve
    if log and done:
        log(f"{out} already holds the points at {sorted(done)} edits; measuring {todo}")
    loaded = model if isinstance(model, LoadedModel) else load_model(name, device=device)
    stored = snapshot_weights(loaded.layout, index["layers"])
    applied = 0
    try:
        for k in todo:
            batches = reachable.index(k)
            journal.replay(loaded, index, start=applied, stop=batches)
            applied = batches
            if log:
                log(f"{k} edits ({batches} batches)")
            result = evaluate_general(
                loaded.model, loaded.tokenizer, data_dir, n_items=n_items,
                tasks=curve["tasks"], batch_size=batch_size, details=details, log=log,
            )  # fmt: skip
            point = {"edits": k, "batches": batches, **result}
            curve["points"] = sorted([*curve["points"], point], key=lambda p: p["edits"])
            if out is not None:
                write_json(out, curve)
    finally:
        restore_weights(loaded.layout, stored)
    return curve


def _stored_points(path: Path, curve: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The points of the curve in ``path``, refused when it was measured on another run,
    item count or task list (its points would not belong to this curve)."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--out {path} is not a JSON file ({error})") from None
    if not isinstance(stored, dict) or not isinstance(stored.get("points"), list):
        raise ValueError(f"--out {path} holds no general-ability curve; give another file")
    same_run = Path(str(stored.get("run_dir"))).resolve() == Path(curve["run_dir"]).resolve()
    for key, same in (
        ("run_dir", same_run),
        ("n_items", stored.get("n_items") == curve["n_items"]),
        ("tasks", stored.get("tasks") == curve["tasks"]),
    ):
        if not same:
            raise ValueError(
                f"--out {path} holds a curve for {key} {stored.get(key)!r}, not "
                f"{curve[key]!r}; give another file or remove it"
            )
    return stored["points"]


# -- lm-evaluation-harness -------------------------------------------------------------------


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
    device = next(model.parameters()).device
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
