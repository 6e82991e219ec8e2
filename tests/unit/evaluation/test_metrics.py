"""Benchmark metrics (sphere_edit.evaluation.metrics) on hand-checkable models and texts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from torch import nn

from sphere_edit.editing.requests import EditRequest
from sphere_edit.editing.text import encode, target_token_ids
from sphere_edit.evaluation.data import EditCase, load_cases
from sphere_edit.evaluation.metrics import (
    CONSISTENCY_UNAVAILABLE,
    TfidfStatistics,
    aggregate,
    average_ranks,
    consecutive_difference_fit,
    evaluate_cases,
    evaluate_generation,
    generation_entropy,
    merge_results,
    ngram_entropy,
    row_seed,
    spearman,
    word_tokens,
)
from sphere_edit.evaluation.scoring import score_one_by_one
from tests import FIXTURES_DIR
from tests.tiny_models import make_tiny_model

FIXTURES = FIXTURES_DIR


class LastTokenLM(nn.Module):
    """A language model whose next-token logits are ``table[last input token]``, so every
    probability and argmax is known from ``table``. Accepts what the scoring and decoding
    code passes (mask, positions, cache, ``logits_to_keep``) and ignores it."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.clone(), requires_grad=False)
        self.config = SimpleNamespace(vocab_size=table.shape[0])

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        logits_to_keep=0,
        use_cache=False,
        cache=None,
    ):
        logits = self.table[input_ids]
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits, cache=None, past_key_values=None)


def _token(tok, prompt: str, target: str) -> int:
    (token,) = target_token_ids(tok, prompt, target)
    return token


def _last(tok, prompt: str) -> int:
    return encode(tok, prompt)[-1]


def _logprob(table: torch.Tensor, prev: int, nxt: int) -> float:
    return float(torch.log_softmax(table[prev].double(), dim=0)[nxt])


# -- CounterFact scores by hand -----------------------------------------------------------


def _counterfact_case() -> EditCase:
    return EditCase(
        case_id=11,
        dataset="counterfact",
        request=EditRequest.create("{} plays the", "Glenn Gould", "guitar", "piano"),
        paraphrase_prompts=("Glenn Gould is a musician who plays the", "Glenn Gould is good at"),
        neighborhood_prompts=("Yo-Yo Ma plays the", "Jimi Hendrix plays"),
        neighborhood_answer="piano",
    )


def test_counterfact_scores_by_hand(tiny_tokenizer):
    tok = tiny_tokenizer
    case = _counterfact_case()
    guitar = _token(tok, "plays the", "guitar")
    piano = _token(tok, "plays the", "piano")
    the, at, plays = (_last(tok, p) for p in ("plays the", "good at", "Jimi Hendrix plays"))
    assert len({the, at, plays, guitar, piano}) == 5
    table = torch.zeros(len(tok), len(tok))
    table[the, guitar], table[the, piano] = 3.0, 1.0  # "... the": guitar wins
    table[at, piano], table[at, guitar] = 2.0, 1.0  # "... at": piano wins
    other = next(t for t in range(1, len(tok)) if t not in (guitar, piano))
    # "... plays": piano beats guitar but is not the argmax.
    table[plays, piano], table[plays, guitar], table[plays, other] = 2.0, 1.0, 3.0
    model = LastTokenLM(table)

    (result,) = evaluate_cases(model, tok, [case])
    assert result["case_id"] == 11 and result["dataset"] == "counterfact"
    assert result["rewrite_top1"] == 1.0 and result["rewrite_prob_success"] == 1.0
    # Paraphrase 1 ends in " the" (guitar wins), paraphrase 2 in "at" (piano wins).
    assert result["paraphrase_top1"] == 0.5 and result["paraphrase_prob_success"] == 0.5
    # Neighbours should say piano: " the" says guitar; " plays" prefers piano to guitar
    # although neither is its argmax.
    assert result["neighborhood_top1"] == 0.0
    assert result["neighborhood_prob_success"] == 0.5

    rewrite = result["prompts"]["rewrite"][0]
    assert rewrite["prompt"] == "Glenn Gould plays the"
    assert rewrite["logprob_new"] == pytest.approx(_logprob(table, the, guitar), abs=1e-6)
    assert rewrite["logprob_old"] == pytest.approx(_logprob(table, the, piano), abs=1e-6)
    second = result["prompts"]["neighborhood"][1]
    assert (second["top1"], second["prob_success"]) == (False, True)
    assert second["logprob_old"] == pytest.approx(_logprob(table, plays, piano), abs=1e-6)
    json.dumps(result)


def test_prob_success_is_strict(tiny_tokenizer):
    """Equal probabilities are no success, in either direction."""
    tok = tiny_tokenizer
    model = LastTokenLM(torch.zeros(len(tok), len(tok)))
    (result,) = evaluate_cases(model, tok, [_counterfact_case()])
    for group in ("rewrite", "paraphrase", "neighborhood"):
        assert result[f"{group}_prob_success"] == 0.0
        assert result[f"{group}_top1"] == 0.0  # the argmax of a flat row is token 0


def test_counterfact_needs_target_true(tiny_tokenizer):
    tok = tiny_tokenizer
    case = EditCase(
        case_id="x",
        dataset="counterfact",
        request=EditRequest.create("{} plays the", "Glenn Gould", "guitar"),
        paraphrase_prompts=(),
        neighborhood_prompts=(),
        neighborhood_answer="piano",
    )
    with pytest.raises(ValueError, match="case 'x'.*target_true"):
        evaluate_cases(LastTokenLM(torch.zeros(len(tok), len(tok))), tok, [case])


# -- zsRE token accuracy by hand -----------------------------------------------------------


def test_zsre_token_accuracy_by_hand(tiny_tokenizer):
    tok = tiny_tokenizer
    question = "Which instrument does Glenn Gould play?"
    case = EditCase(
        case_id=0,
        dataset="zsre",
        request=EditRequest.create(question, "Glenn Gould", "piano guitar"),
        paraphrase_prompts=("What instrument is played by Glenn Gould",),
        neighborhood_prompts=("who plays the",),
        neighborhood_answer="Paris",
    )
    piano, guitar = target_token_ids(tok, question, "piano guitar")
    mark, the = _last(tok, question), _last(tok, "who plays the")
    paris = _token(tok, "who plays the", "Paris")
    rival = next(t for t in range(1, len(tok)) if t not in (piano, guitar, paris))
    table = torch.zeros(len(tok), len(tok))
    table[mark, piano] = 3.0  # "?" -> piano: right
    table[piano, rival] = 3.0  # piano -> rival, not guitar: wrong
    table[the, paris] = 3.0
    (result,) = evaluate_cases(LastTokenLM(table), tok, [case])
    assert result["rewrite_token_acc"] == 0.5
    # The rephrase ends in a token whose row is flat: its argmax is token 0, so the first
    # target token is wrong, and the second follows piano -> rival: wrong too.
    assert result["paraphrase_token_acc"] == 0.0
    assert result["neighborhood_token_acc"] == 1.0
    assert result["prompts"]["rewrite"][0]["top1"] is False
    assert result["prompts"]["neighborhood"][0]["top1"] is True
    json.dumps(result)
    summary = aggregate([result])
    assert (summary["efficacy"], summary["generalization"], summary["specificity"]) == (
        0.5,
        0.0,
        1.0,
    )


# -- batched equals one prompt at a time, for either padding side -------------------------


def _fixture_cases() -> list[EditCase]:
    return [
        *load_cases(FIXTURES / "counterfact_rome.json"),
        *load_cases(FIXTURES / "counterfact_flat.json", limit=2),
        *load_cases(FIXTURES / "zsre.json"),
    ]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_equals_one_at_a_time(tiny_model, padding_side):
    model, tok = tiny_model
    original, tok.padding_side = tok.padding_side, padding_side
    try:
        cases = _fixture_cases()
        batched = evaluate_cases(model, tok, cases, batch_size=7)
        single = [evaluate_cases(model, tok, [case], batch_size=1)[0] for case in cases]
    finally:
        tok.padding_side = original  # the tokenizer fixture is shared by the session
    for got, want in zip(batched, single, strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, abs=1e-9), key
        for group, rows in want["prompts"].items():
            for got_row, want_row in zip(got["prompts"][group], rows, strict=True):
                for key, value in want_row.items():
                    if isinstance(value, float):
                        assert got_row[key] == pytest.approx(value, abs=1e-4), (group, key)
                    else:
                        assert got_row[key] == value, (group, key)
    # And against the unpadded reference scorer, for the rewrite prompts of CounterFact.
    counterfact = [(c, r) for c, r in zip(cases, batched, strict=True) if c.dataset != "zsre"]
    reference = score_one_by_one(
        model,
        tok,
        [c.request.text for c, _ in counterfact],
        [c.request.target_new for c, _ in counterfact],
    )
    for (_, result), score in zip(counterfact, reference, strict=True):
        row = result["prompts"]["rewrite"][0]
        assert row["logprob_new"] == pytest.approx(score.logprob, abs=1e-4)
        assert row["top1"] == score.top1


# -- aggregation -------------------------------------------------------------------------


def test_aggregate_means_and_headlines():
    results = [
        {"case_id": 1, "dataset": "counterfact", "rewrite_top1": 1.0, "paraphrase_top1": 0.5,
         "neighborhood_top1": 1.0, "rewrite_prob_success": 1.0, "prompts": {}},
        {"case_id": 2, "dataset": "counterfact", "rewrite_top1": 0.0, "paraphrase_top1": None,
         "neighborhood_top1": 0.5, "rewrite_prob_success": 1.0, "prompts": {}},
    ]  # fmt: skip
    generation = [
        {"case_id": 2, "ngram_entropy": 5.0, "consistency": None, "generations": ["a"]},
        {"case_id": 1, "ngram_entropy": 6.0, "consistency": None, "generations": ["b"]},
    ]
    merged = merge_results(results, generation)
    assert [r["case_id"] for r in merged] == [1, 2]
    assert merged[0]["ngram_entropy"] == 6.0 and merged[1]["generations"] == ["a"]
    summary = aggregate(merged)
    assert summary["n_cases"] == 2
    assert summary["efficacy"] == 0.5 and summary["rewrite_top1"] == 0.5
    assert summary["generalization"] == 0.5 and summary["n_paraphrase_top1"] == 1
    assert summary["specificity"] == 0.75
    assert summary["rewrite_prob_success"] == 1.0
    assert summary["fluency"] == 5.5
    assert summary["consistency"] is None  # never made up
    assert "case_id" not in summary and "dataset" not in summary and "prompts" not in summary
    json.dumps(summary)
    with pytest.raises(ValueError, match="case_id 3"):
        merge_results(results, [{"case_id": 3}])


# -- fluency -------------------------------------------------------------------------------


def test_word_tokens():
    assert word_tokens("Hello, world. It's well-known!") == [
        "Hello", ",", "world", ".", "It's", "well-known", "!",
    ]  # fmt: skip


def test_ngram_entropy_by_hand():
    # Bigrams of "a b a b a": ab, ba, ab, ba -> two equally frequent: H2 = 1 bit.
    # Trigrams: aba, bab, aba -> 2/3, 1/3: H3 = log2(3) - 2/3 bits.
    h2, h3 = 1.0, math.log2(3) - 2 / 3
    assert ngram_entropy("a b a b a") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert ngram_entropy("a b a b a") == pytest.approx(h2 / 3 + 2 * h3 / 3)
    # Four distinct words: 3 bigrams, 2 trigrams, all different.
    assert ngram_entropy("w x y z") == pytest.approx(math.log2(3) / 3 + 2 / 3)
    # Repetition is what the metric punishes: one repeated word has zero entropy.
    assert ngram_entropy("the the the the the") == 0.0
    assert ngram_entropy("one") == 0.0  # no n-grams at all
    assert ngram_entropy("a b a b a", ns=(2,), weights=(1.0,)) == pytest.approx(1.0)
    assert generation_entropy(["a b a b a", "the the the"]) == pytest.approx(
        ngram_entropy("a b a b a") / 2
    )
    with pytest.raises(ValueError):
        generation_entropy([])


# -- consistency -------------------------------------------------------------------------


def _tfidf(tmp_path: Path, vocabulary: dict[str, int], idf: list[float]) -> TfidfStatistics:
    np.save(tmp_path / "idf.npy", np.asarray(idf))
    (tmp_path / "tfidf_vocab.json").write_text(json.dumps(vocabulary), encoding="utf-8")
    return TfidfStatistics.load(tmp_path / "idf.npy", tmp_path / "tfidf_vocab.json")


def test_tfidf_cosine_by_hand(tmp_path):
    stats_ = _tfidf(tmp_path, {"guitar": 0, "piano": 1, "plays": 2}, [2.0, 1.0, 3.0])
    # "He plays the guitar, guitar": guitar x2, plays x1 (he/the are not in the vocabulary)
    # -> (4, 0, 3); "Plays piano." -> (0, 1, 3); cosine 9 / (5 · √10).
    a, b = "He plays the guitar, guitar", "Plays piano."
    assert stats_.vector(a).tolist() == [4.0, 0.0, 3.0]
    assert stats_.cosine(a, b) == pytest.approx(9 / (5 * math.sqrt(10)))
    assert stats_.cosine(a, a) == pytest.approx(1.0)
    assert stats_.cosine(a, "nothing known") == 0.0


def test_tfidf_cosine_matches_scikit_learn(tmp_path):
    from sklearn.feature_extraction.text import TfidfVectorizer

    words = ["guitar", "piano", "plays", "city", "paris", "the", "canada", "of"]
    vocabulary = {w: i for i, w in enumerate(words)}
    idf = [1.5, 2.0, 1.2, 3.1, 2.7, 1.0, 2.2, 1.05]
    ours = _tfidf(tmp_path, vocabulary, idf)
    reference = TfidfVectorizer(vocabulary=vocabulary).fit(words)
    reference.idf_ = np.asarray(idf)
    a = "The city of Paris plays the piano; Paris, PARIS! a guitar"
    b = "Canada of the city: the guitar plays Guitar-piano"
    encoded = reference.transform([a, b]).toarray()
    assert ours.cosine(a, b) == pytest.approx(float(encoded[0] @ encoded[1]), abs=1e-12)


def test_tfidf_rejects_inconsistent_statistics():
    with pytest.raises(ValueError, match="outside"):
        TfidfStatistics({"a": 3}, np.ones(2))


# -- generation ----------------------------------------------------------------------------


def test_generation_on_a_known_model(tiny_tokenizer, tmp_path):
    """Every row of the table puts all its mass on one token, so top-k sampling has one
    outcome: "piano" after anything, then "guitar", then "piano", ..."""
    tok = tiny_tokenizer
    piano, guitar = target_token_ids(tok, "plays the", "piano guitar")
    table = torch.full((len(tok), len(tok)), -1e4)
    table[:, piano] = 0.0
    table[piano, piano], table[piano, guitar] = -1e4, 0.0
    model = LastTokenLM(table)
    rome = load_cases(FIXTURES / "counterfact_rome.json", limit=1)[0]
    flat = load_cases(FIXTURES / "counterfact_flat.json", limit=1)[0]
    with_reference = EditCase(
        **{**rome.__dict__, "reference_texts": ("The piano and the guitar.", "A piano.")}
    )
    statistics = _tfidf(tmp_path, {"piano": 0, "guitar": 1, "glenn": 2}, [1.0, 2.0, 1.0])
    results = evaluate_generation(
        model, tok, [rome, flat, with_reference], tfidf=statistics, new_tokens=4, top_k=5
    )
    continuation = tok.decode([piano, guitar, piano, guitar])
    first, second, third = results
    assert first["generation_source"] == "generation_prompts"
    assert first["generations"] == [p + continuation for p in rome.generation_prompts]
    assert second["generation_source"] == "rewrite+paraphrase"
    assert second["generations"] == [
        p + continuation for p in (flat.request.text, *flat.paraphrase_prompts)
    ]
    assert first["ngram_entropy"] == pytest.approx(generation_entropy(first["generations"]))
    for result in (first, second):
        assert result["consistency"] is None
        assert result["consistency_reason"].startswith(CONSISTENCY_UNAVAILABLE)
    joined = " ".join(third["generations"])
    assert third["consistency"] == pytest.approx(
        statistics.cosine(joined, "The piano and the guitar. A piano.")
    )
    assert third["consistency_reason"] is None
    json.dumps(results)
    (no_stats,) = evaluate_generation(model, tok, [with_reference], new_tokens=2)
    assert no_stats["consistency"] is None and "TF-IDF" in no_stats["consistency_reason"]


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_generation_is_seeded_per_row(tiny_tokenizer, model_type):
    """A case's generations depend on the seed and its case_id, not on its batch."""
    tok = tiny_tokenizer
    model = make_tiny_model(model_type, tok, seed=0)
    cases = load_cases(FIXTURES / "counterfact_rome.json").cases
    together = evaluate_generation(model, tok, cases, new_tokens=6, batch_size=8)
    one_by_one = evaluate_generation(model, tok, cases, new_tokens=6, batch_size=1)
    alone = evaluate_generation(model, tok, cases[1:2], new_tokens=6)
    assert [r["generations"] for r in together] == [r["generations"] for r in one_by_one]
    assert alone[0]["generations"] == together[1]["generations"]
    other_seed = evaluate_generation(model, tok, cases, new_tokens=6, seed=1)
    assert [r["generations"] for r in other_seed] != [r["generations"] for r in together]
    assert row_seed(0, 7, 0) == row_seed(0, 7, 0) != row_seed(0, 7, 1)
    assert 0 <= row_seed(3, "x") < 2**63


# -- correlation with hyperspherical energy ----------------------------------------------


def test_average_ranks_and_spearman_by_hand():
    assert average_ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="length"):
        spearman([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        spearman([1, float("nan")], [1, 2])


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(-4, 4), st.floats(-1e3, 1e3, allow_nan=False)),
        min_size=3,
        max_size=30,
    )
)
def test_spearman_matches_scipy(points):
    x = [float(a) for a, _ in points]  # few distinct values: many ties
    y = [b for _, b in points]
    want = stats.spearmanr(x, y).statistic
    got = spearman(x, y)
    if math.isnan(want):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(want, abs=1e-9)


def test_consecutive_difference_fit_matches_scipy():
    he = [1.0, 1.5, 1.7, 2.6, 2.8, 3.9]
    metric = [0.9, 0.85, 0.86, 0.7, 0.69, 0.5]
    fit = consecutive_difference_fit(he, metric)
    want = stats.linregress(np.diff(he), np.diff(metric))
    assert fit.n == 5
    assert fit.slope == pytest.approx(want.slope, abs=1e-12)
    assert fit.intercept == pytest.approx(want.intercept, abs=1e-12)
    assert fit.r == pytest.approx(want.rvalue, abs=1e-12)
    # By hand: the differences lie on dy = -0.2 dx exactly.
    exact = consecutive_difference_fit([0, 1, 3, 6], [1, 0.8, 0.4, -0.2])
    assert (exact.slope, exact.intercept, exact.r) == pytest.approx((-0.2, 0.0, -1.0))
    with pytest.raises(ValueError, match="all equal"):
        consecutive_difference_fit([0, 1, 2, 3], [1, 2, 4, 8])
    with pytest.raises(ValueError, match="at least 3"):
        consecutive_difference_fit([0, 1], [1, 2])
