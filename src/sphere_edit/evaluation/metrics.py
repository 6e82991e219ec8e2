"""Benchmark metrics: per-case edit scores, fluency, consistency, and HE correlations.

Public API
----------
``evaluate_cases(model, tokenizer, cases, *, batch_size=64) -> list[dict]``
    Teacher-forced scores of every case (:class:`~sphere_edit.evaluation.data.EditCase`).
    All prompts of all cases go through
    :func:`~sphere_edit.evaluation.scoring.score_targets` together (sorted by length,
    ``batch_size`` rows per forward pass). One JSON-serialisable dict per case:

    CounterFact (``dataset == "counterfact"``), for ``g`` in rewrite / paraphrase /
    neighborhood, each the mean over the group's prompts (``None`` for an empty group):

    - ``g_top1``: the expected target is the argmax at every one of its tokens (teacher
      forcing), i.e. greedy decoding would produce it. Expected: ``target_new`` for
      rewrite and paraphrase prompts, the true answer (``neighborhood_answer``) for
      neighbourhood prompts.
    - ``g_prob_success``: the probability comparison, on the total log-probability of each
      target's tokens: P(new) > P(old) for rewrite and paraphrase, P(old) > P(new) for
      neighbourhood prompts (strict: a tie is a failure).

    zsRE (``dataset == "zsre"``): ``g_token_acc``, the fraction of the expected target's
    tokens that are the argmax (teacher forcing), for the question (rewrite), its rephrase
    (paraphrase) and the NQ question (neighborhood) against ``loc_ans``.

    Every dict also holds ``case_id``, ``dataset`` and ``prompts``: per group, one record per
    prompt with its ``logprob_new``, ``logprob_old`` (CounterFact; for neighbourhood prompts
    "old" is the true answer) and ``top1`` / ``token_acc``.
``evaluate_generation(model, tokenizer, cases, *, tfidf=None, seed=0, new_tokens=100,
top_k=5, batch_size=32) -> list[dict]``
    Sampled text per case and its fluency and consistency: ``generation_source``
    (``"generation_prompts"``, or ``"rewrite+paraphrase"`` when the data has none),
    ``generations``, ``ngram_entropy`` (:func:`generation_entropy`), ``consistency``
    (TF-IDF cosine, or ``None``) and ``consistency_reason`` (why it is ``None``).
``aggregate(results) -> dict``
    Means over cases of every numeric per-case value, ``n_cases``, and the paper's names:
    ``efficacy``/``generalization``/``specificity`` = the top-1 accuracies (CounterFact) or
    the token accuracies (zsRE) of rewrite/paraphrase/neighbourhood prompts, ``fluency`` =
    mean ``ngram_entropy``, ``consistency`` = mean TF-IDF cosine.
``merge_results(*per_case_lists) -> list[dict]``
    Join per-case dicts (e.g. scores and generation metrics) on ``case_id``.
``ngram_entropy(text)``, ``generation_entropy(texts)``, ``word_tokens(text)``
``TfidfStatistics.load(idf_path, vocab_path)``, ``.cosine(a, b)``
``sample_texts(model, tokenizer, prompts, seeds, *, new_tokens, top_k, batch_size)``
``spearman(x, y) -> float``, ``average_ranks(values)``,
``consecutive_difference_fit(he, metric) -> LinearFit``

Scoring never reads ``tokenizer.padding_side``: rows are padded by :mod:`.text`'s own
left padding with explicit positions, so the numbers equal one-prompt-at-a-time scoring
for either padding side (tested).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..editing.sampling import decode_tokens
from ..editing.text import encode
from .data import EditCase
from .scoring import TargetScore, score_targets

GROUPS = ("rewrite", "paraphrase", "neighborhood")

# The paper's names, and the per-case values they average (first one present wins).
HEADLINES: dict[str, tuple[str, ...]] = {
    "efficacy": ("rewrite_top1", "rewrite_token_acc"),
    "generalization": ("paraphrase_top1", "paraphrase_token_acc"),
    "specificity": ("neighborhood_top1", "neighborhood_token_acc"),
    "fluency": ("ngram_entropy",),
    "consistency": ("consistency",),
}

CONSISTENCY_UNAVAILABLE = "not available for this data"


# -- teacher-forced scores ------------------------------------------------------------


@dataclass(frozen=True)
class _Probe:
    """One prompt of one case: the target it should produce and, for a probability
    comparison, the rival target."""

    case: int
    group: str
    prompt: str
    expected: str
    rival: str | None


def _probes(index: int, case: EditCase) -> list[_Probe]:
    request = case.request
    prompts = {
        "rewrite": (request.text,),
        "paraphrase": case.paraphrase_prompts,
        "neighborhood": case.neighborhood_prompts,
    }
    if case.dataset == "zsre":
        expected = {"rewrite": request.target_new, "paraphrase": request.target_new}
        expected["neighborhood"] = case.neighborhood_answer
        return [
            _Probe(index, group, prompt, expected[group], None)
            for group in GROUPS
            for prompt in prompts[group]
        ]
    if case.dataset != "counterfact":
        raise ValueError(f"case {case.case_id!r}: unknown dataset {case.dataset!r}")
    if request.target_true is None:
        raise ValueError(
            f"case {case.case_id!r}: a CounterFact case needs target_true for the "
            "probability comparison"
        )
    new, old = request.target_new, request.target_true
    pairs = {
        "rewrite": (new, old),
        "paraphrase": (new, old),
        "neighborhood": (case.neighborhood_answer, new),
    }
    return [
        _Probe(index, group, prompt, *pairs[group]) for group in GROUPS for prompt in prompts[group]
    ]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def evaluate_cases(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cases: Sequence[EditCase],
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Per-case teacher-forced scores (see the module docstring for the keys);
    ``progress`` reports the scoring passes on stderr."""
    probes = [probe for i, case in enumerate(cases) for probe in _probes(i, case)]
    # Expected targets first, then the rivals; all in one batched scoring call.
    rivals = [(p.prompt, p.rival) for p in probes if p.rival is not None]
    prompts = [p.prompt for p in probes] + [prompt for prompt, _ in rivals]
    targets = [p.expected for p in probes] + [rival for _, rival in rivals]
    scores = score_targets(
        model, tokenizer, prompts, targets, batch_size=batch_size, progress=progress
    )
    expected_scores = scores[: len(probes)]
    rival_scores = iter(scores[len(probes) :])

    per_case: list[dict[str, list[tuple[_Probe, TargetScore, TargetScore | None]]]] = [
        {group: [] for group in GROUPS} for _ in cases
    ]
    for probe, score in zip(probes, expected_scores, strict=True):
        rival = next(rival_scores) if probe.rival is not None else None
        per_case[probe.case][probe.group].append((probe, score, rival))
    return [
        _counterfact_result(case, groups)
        if case.dataset == "counterfact"
        else _zsre_result(case, groups)
        for case, groups in zip(cases, per_case, strict=True)
    ]


def _counterfact_result(case: EditCase, groups: Mapping[str, list]) -> dict[str, Any]:
    result: dict[str, Any] = {"case_id": case.case_id, "dataset": case.dataset}
    details: dict[str, list[dict[str, Any]]] = {}
    for group in GROUPS:
        rows = []
        for probe, expected, rival in groups[group]:
            # Neighbourhood prompts expect the old answer; rewrite/paraphrase the new one.
            new, old = (rival, expected) if group == "neighborhood" else (expected, rival)
            rows.append(
                {
                    "prompt": probe.prompt,
                    "logprob_new": new.logprob,
                    "logprob_old": old.logprob,
                    "top1": expected.top1,
                    "prob_success": expected.logprob > rival.logprob,
                }
            )
        result[f"{group}_top1"] = _mean([float(r["top1"]) for r in rows])
        result[f"{group}_prob_success"] = _mean([float(r["prob_success"]) for r in rows])
        details[group] = rows
    result["prompts"] = details
    return result


def _zsre_result(case: EditCase, groups: Mapping[str, list]) -> dict[str, Any]:
    result: dict[str, Any] = {"case_id": case.case_id, "dataset": case.dataset}
    details: dict[str, list[dict[str, Any]]] = {}
    for group in GROUPS:
        rows = [
            {
                "prompt": probe.prompt,
                "target": probe.expected,
                "token_acc": score.token_accuracy,
                "top1": score.top1,
                "logprob": score.logprob,
            }
            for probe, score, _ in groups[group]
        ]
        result[f"{group}_token_acc"] = _mean([r["token_acc"] for r in rows])
        details[group] = rows
    result["prompts"] = details
    return result


# -- aggregation --------------------------------------------------------------------------

_NOT_AVERAGED = {"case_id", "record_index"}


def aggregate(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over cases of every numeric top-level value (``None`` values are left out;
    ``n_<key>`` says how many cases a mean covers when that is fewer than all), led by
    ``n_cases`` and the paper's names of :data:`HEADLINES`."""
    keys: list[str] = []
    for result in results:
        keys.extend(k for k in result if k not in keys and k not in _NOT_AVERAGED)
    means: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for key in keys:
        values = [float(r[key]) for r in results if isinstance(r.get(key), (bool, int, float))]
        if not values and not any(key in r and r[key] is None for r in results):
            continue  # not a numeric value (text, lists, details)
        means[key] = _mean(values)
        if len(values) != len(results):
            counts[f"n_{key}"] = len(values)
    summary: dict[str, Any] = {"n_cases": len(results)}
    for name, sources in HEADLINES.items():
        present = [s for s in sources if means.get(s) is not None]
        if present:
            summary[name] = means[present[0]]
    summary.update(means)
    summary.update(counts)
    return summary


def merge_results(*per_case: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Join lists of per-case dicts on ``case_id`` (order of the first list; a later
    list's value wins for a repeated key)."""
    if not per_case:
        return []
    merged = {r["case_id"]: dict(r) for r in per_case[0]}
    for results in per_case[1:]:
        for result in results:
            if result["case_id"] not in merged:
                raise ValueError(f"case_id {result['case_id']!r} is not in the first list")
            merged[result["case_id"]].update(result)
    return list(merged.values())


# -- fluency: n-gram entropy ----------------------------------------------------------

# Words (inner hyphens and apostrophes kept) and single punctuation marks: close to
# nltk.word_tokenize, which MEMIT uses, without depending on nltk.
_WORD = re.compile(r"\w+(?:[-']\w+)*|[^\w\s]")


def word_tokens(text: str) -> list[str]:
    return _WORD.findall(text)


def _entropy_bits(counts: Counter) -> float:
    total = sum(counts.values())
    if total == 0:
        return 0.0  # no n-grams at all (text shorter than n words): MEMIT's sum is 0
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def ngram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """MEMIT's ``compute_n_gram_entropy``: the weighted *mean* ``(1/len(ns)) Σ_n w_n H_n``,
    ``H_n`` the entropy in bits of the frequency distribution of word n-grams in ``text``.

    With the defaults that is ``(1/2)(2/3 H_2 + 4/3 H_3) = H_2/3 + 2 H_3/3``.
    """
    if len(ns) != len(weights):
        raise ValueError(f"got {len(ns)} n-gram sizes but {len(weights)} weights")
    words = word_tokens(text)
    total = 0.0
    for n, weight in zip(ns, weights, strict=True):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total += weight * _entropy_bits(grams)
    return total / len(ns)


def generation_entropy(texts: Sequence[str]) -> float:
    """The fluency of a set of generations: the mean :func:`ngram_entropy` over texts."""
    if not texts:
        raise ValueError("no texts to measure")
    return sum(ngram_entropy(t) for t in texts) / len(texts)


# -- consistency: TF-IDF cosine --------------------------------------------------------

# scikit-learn's default TfidfVectorizer tokens (what MEMIT's IDF statistics were made
# with): lower-cased runs of two or more word characters.
_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")


@dataclass(frozen=True)
class TfidfStatistics:
    """IDF weights over a vocabulary, as in MEMIT's ``idf.npy`` + ``tfidf_vocab.json``."""

    vocabulary: Mapping[str, int]
    idf: np.ndarray

    def __post_init__(self) -> None:
        if self.idf.ndim != 1:
            raise ValueError(f"idf must be one-dimensional, got shape {self.idf.shape}")
        bad = [w for w, i in self.vocabulary.items() if not 0 <= i < len(self.idf)]
        if bad:
            raise ValueError(
                f"vocabulary index of {bad[0]!r} is outside the {len(self.idf)} idf values"
            )

    @classmethod
    def load(cls, idf_path: str | Path, vocab_path: str | Path) -> TfidfStatistics:
        idf = np.load(idf_path, allow_pickle=False).astype(np.float64)
        with open(vocab_path, encoding="utf-8") as handle:
            vocabulary = json.load(handle)
        if not isinstance(vocabulary, dict):
            raise ValueError(f"{vocab_path} must hold a JSON object word -> index")
        return cls({str(w): int(i) for w, i in vocabulary.items()}, idf)

    def vector(self, text: str) -> np.ndarray:
        """Term counts times IDF over the vocabulary (words outside it are ignored)."""
        out = np.zeros(len(self.idf), dtype=np.float64)
        for word in _TFIDF_TOKEN.findall(text.lower()):
            index = self.vocabulary.get(word)
            if index is not None:
                out[index] += 1.0
        return out * self.idf

    def cosine(self, text_a: str, text_b: str) -> float:
        """Cosine of the two TF-IDF vectors; 0.0 when either has no vocabulary word (the
        convention of scikit-learn's ``cosine_similarity``)."""
        a, b = self.vector(text_a), self.vector(text_b)
        norm = float(np.linalg.norm(a) * np.linalg.norm(b))
        return float(a @ b) / norm if norm > 0 else 0.0


# -- generation ---------------------------------------------------------------------------


def row_seed(seed: int, *key: object) -> int:
    """A 63-bit seed for one generated row, from the run's seed and the row's identity
    (stable across processes, unlike ``hash``)."""
    text = "/".join(str(part) for part in (seed, *key))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


@torch.no_grad()
def sample_texts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    new_tokens: int = 100,
    top_k: int = 5,
    batch_size: int = 32,
) -> list[str]:
    """Top-k samples of ``new_tokens`` tokens after each prompt (stopping at end of
    sequence), each row drawing from its own ``torch.Generator`` seeded by ``seeds[i]``,
    so a row's text does not depend on which rows share its batch. Returns prompt +
    continuation, as MEMIT measures it."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    if top_k < 1 or batch_size < 1 or new_tokens < 0:
        raise ValueError("top_k and batch_size must be >= 1 and new_tokens >= 0")
    rows = [encode(tokenizer, p) for p in prompts]
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) tokenises to nothing")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    texts = [""] * len(rows)
    for begin in range(0, len(order), batch_size):
        chunk = order[begin : begin + batch_size]
        generators = [torch.Generator(device="cpu").manual_seed(seeds[i]) for i in chunk]

        def pick(logits: torch.Tensor, generators=generators) -> torch.Tensor:
            values, index = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
            probs = torch.softmax(values, dim=-1).cpu()
            choice = torch.stack(
                [torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)]
            )
            return index.gather(1, choice.to(index.device)).squeeze(1)

        new = decode_tokens(
            model, tokenizer, [rows[i] for i in chunk], new_tokens, pick, stop_at_eos=True
        )
        for i, ids in zip(chunk, new, strict=True):
            texts[i] = prompts[i] + tokenizer.decode(ids, skip_special_tokens=True)
    return texts


def generation_prompts_for(case: EditCase) -> tuple[tuple[str, ...], str]:
    """The prompts to generate from and their source: the data's generation prompts, or
    the rewrite prompt and its paraphrases when it has none."""
    if case.generation_prompts:
        return case.generation_prompts, "generation_prompts"
    return (case.request.text, *case.paraphrase_prompts), "rewrite+paraphrase"


def evaluate_generation(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cases: Sequence[EditCase],
    *,
    tfidf: TfidfStatistics | None = None,
    seed: int = 0,
    new_tokens: int = 100,
    top_k: int = 5,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Fluency and consistency per case (see the module docstring for the keys).

    Row ``j`` of case ``c`` samples with seed ``row_seed(seed, c.case_id, j)``, so a case's
    generations are the same whatever other cases are evaluated with it. Consistency is
    MEMIT's: the TF-IDF cosine between all of a case's generations joined by spaces and all
    its ``reference_texts`` joined by spaces; ``None`` (with the reason) when the case has
    no reference texts or no statistics are given.
    """
    plans = [generation_prompts_for(case) for case in cases]
    prompts = [p for prompts, _ in plans for p in prompts]
    seeds = [
        row_seed(seed, case.case_id, j)
        for case, (case_prompts, _) in zip(cases, plans, strict=True)
        for j in range(len(case_prompts))
    ]
    texts = iter(
        sample_texts(
            model, tokenizer, prompts, seeds,
            new_tokens=new_tokens, top_k=top_k, batch_size=batch_size,
        )
    )  # fmt: skip
    results = []
    for case, (case_prompts, source) in zip(cases, plans, strict=True):
        generations = [next(texts) for _ in case_prompts]
        consistency, reason = None, None
        if not case.reference_texts:
            reason = f"{CONSISTENCY_UNAVAILABLE}: the case has no reference texts"
        elif tfidf is None:
            reason = f"{CONSISTENCY_UNAVAILABLE}: no TF-IDF statistics were given"
        else:
            consistency = tfidf.cosine(" ".join(generations), " ".join(case.reference_texts))
        results.append(
            {
                "case_id": case.case_id,
                "generation_source": source,
                "generations": generations,
                "ngram_entropy": generation_entropy(generations),
                "consistency": consistency,
                "consistency_reason": reason,
            }
        )
    return results


# -- hyperspherical energy vs. metrics ---------------------------------------------------


def _series(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a one-dimensional series")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds a NaN or infinite value")
    return array


def _pair(x: Sequence[float], y: Sequence[float], minimum: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = _series(x, "the first series"), _series(y, "the second series")
    if len(a) != len(b):
        raise ValueError(f"the series differ in length ({len(a)} and {len(b)})")
    if len(a) < minimum:
        raise ValueError(f"need at least {minimum} points, got {len(a)}")
    return a, b


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of the ranks they span."""
    array = _series(values, "values")
    order = np.argsort(array, kind="stable")
    ranks = np.empty(len(array), dtype=np.float64)
    start = 0
    while start < len(order):
        stop = start
        while stop + 1 < len(order) and array[order[stop + 1]] == array[order[start]]:
            stop += 1
        ranks[order[start : stop + 1]] = (start + stop) / 2 + 1
        start = stop + 1
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    da, db = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float(da @ da) * float(db @ db))
    # A constant series has no correlation; NaN, as scipy returns.
    return float(da @ db) / denominator if denominator > 0 else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: the Pearson correlation of the average ranks (NaN
    when either series is constant)."""
    a, b = _pair(x, y, 2)
    return _pearson(average_ranks(a), average_ranks(b))


@dataclass(frozen=True)
class LinearFit:
    """Least-squares line ``dy = slope · dx + intercept`` and Pearson's r of the points."""

    slope: float
    intercept: float
    r: float
    n: int


def consecutive_difference_fit(he: Sequence[float], metric: Sequence[float]) -> LinearFit:
    """Fit the change of a metric between consecutive checkpoints against the change of
    hyperspherical energy (the scatter of the SPHERE paper's Figure 3):
    ``dx_i = he[i+1] - he[i]``, ``dy_i = metric[i+1] - metric[i]``."""
    a, b = _pair(he, metric, 3)
    dx, dy = np.diff(a), np.diff(b)
    centred = dx - dx.mean()
    spread = float(centred @ centred)
    if spread == 0:
        raise ValueError("the HE differences are all equal; no line fits them")
    slope = float(centred @ (dy - dy.mean())) / spread
    return LinearFit(
        slope=slope,
        intercept=float(dy.mean() - slope * dx.mean()),
        r=_pearson(dx, dy),
        n=len(dx),
    )
