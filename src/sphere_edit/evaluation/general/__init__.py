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

The package: :mod:`.prompts` (prompts and answer parsing), :mod:`.loaders` (the files),
:mod:`.scoring` (running the model), :mod:`.tasks` (the table of tasks),
:mod:`.evaluate` (:func:`evaluate_general`), :mod:`.curve` (:func:`general_curve`) and
:mod:`.harness` (lm-evaluation-harness).
"""

from __future__ import annotations

from .curve import accuracy_keys, general_curve
from .evaluate import evaluate_general
from .harness import lm_eval_evaluate
from .loaders import (
    DATA_ENV,
    DEFAULT_N_ITEMS,
    Example,
    load_boolq,
    load_gsm8k,
    load_nq,
    load_rte,
    resolve_data_dir,
)
from .prompts import (
    BOOLQ_CHOICES,
    GSM8K_NEW_TOKENS,
    NQ_NEW_TOKENS,
    RTE_CHOICES,
    TRUE_FALSE,
    YES_NO,
    GeneralDataError,
    boolq_prompt,
    extract_numbers,
    gsm8k_correct,
    gsm8k_gold,
    gsm8k_prompt,
    gsm8k_rationale,
    normalize_answer,
    nq_prompt,
    parse_choice,
    rte_prompt,
    span_match,
)
from .scoring import loglik_choices, one_pass_choices, score_binary, score_gsm8k, score_nq
from .tasks import LOADERS, TASK_FILES, TASK_TABLE, TASKS, GeneralTask, task_list

__all__ = [
    "BOOLQ_CHOICES",
    "DATA_ENV",
    "DEFAULT_N_ITEMS",
    "GSM8K_NEW_TOKENS",
    "LOADERS",
    "NQ_NEW_TOKENS",
    "RTE_CHOICES",
    "TASKS",
    "TASK_FILES",
    "TASK_TABLE",
    "TRUE_FALSE",
    "YES_NO",
    "Example",
    "GeneralDataError",
    "GeneralTask",
    "accuracy_keys",
    "boolq_prompt",
    "evaluate_general",
    "extract_numbers",
    "general_curve",
    "gsm8k_correct",
    "gsm8k_gold",
    "gsm8k_prompt",
    "gsm8k_rationale",
    "load_boolq",
    "load_gsm8k",
    "load_nq",
    "load_rte",
    "lm_eval_evaluate",
    "loglik_choices",
    "normalize_answer",
    "nq_prompt",
    "one_pass_choices",
    "parse_choice",
    "resolve_data_dir",
    "rte_prompt",
    "score_binary",
    "score_gsm8k",
    "score_nq",
    "span_match",
    "task_list",
]
