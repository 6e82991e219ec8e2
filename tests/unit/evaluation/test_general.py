"""General-ability evaluation: prompts, answer parsing and scoring on hand-written fixtures,
the log-likelihood choice, batching, the lm-evaluation-harness adapter and the CLI."""

from __future__ import annotations

import json
import math
import zlib
from decimal import Decimal
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from sphere_edit.cli.app import app
from sphere_edit.evaluation import general
from sphere_edit.evaluation.general import (
    GeneralDataError,
    evaluate_general,
    extract_numbers,
    gsm8k_correct,
    gsm8k_gold,
    load_boolq,
    load_gsm8k,
    load_nq,
    load_rte,
    loglik_choices,
    normalize_answer,
    parse_choice,
    resolve_data_dir,
    span_match,
)
from sphere_edit.evaluation.scoring import score_one_by_one
from tests import FIXTURES_DIR
from tests.tiny_models import TINY_VOCAB_SIZE, make_tiny_model, make_tiny_tokenizer

FIXTURES = FIXTURES_DIR / "general"


# -- prompts ---------------------------------------------------------------------------------


def test_gsm8k_prompt_holds_the_rationale_before_the_answer_marker():
    examples = load_gsm8k(FIXTURES / "test-reasoning.jsonl")
    assert len(examples) == 3
    assert examples[0].prompt == (
        "Q: Ann has 3 apples and buys 4 more. How many apples does she have? "
        "A: Let's think step by step. Ann has 3 + 4 = <<3+4=7>>7 apples. "
        "Therefore, the answer (arabic numerals) is:"
    )
    assert [e.gold for e in examples] == [Decimal(7), Decimal(1000), Decimal(-2)]
    assert "####" not in examples[1].prompt


def test_rte_prompt_and_labels():
    examples = load_rte(FIXTURES / "test-NLI.tsv")
    assert examples[0].prompt == (
        "Paris is the capital of France. entails Paris is in France.. True or False? answer:"
    )
    assert [e.gold for e in examples] == [True, False, True, False]
    # Quotes inside a field are text, not TSV quoting.
    assert 'He said "hello" to the team.' in examples[2].prompt


def test_nq_prompt_uses_the_passage_and_keeps_every_answer():
    examples = load_nq(FIXTURES / "test-OpenDomainQA.jsonl")
    assert examples[0].prompt == (
        "Refer to the passage below and answer the following question.\n"
        "Passage: Paris is the capital and largest city of France.\n"
        "Question: what is the capital of france?\nAnswer:"
    )
    assert examples[1].gold == ["Glenn Gould", "Gould"]


def test_boolq_prompt():
    examples = load_boolq(FIXTURES / "test-ClosedDomainQA.jsonl")
    assert examples[1].prompt == (
        "Please answer the given question based on the passage. The answer should be exact "
        "'yes' or 'no'. passage: Rome is the capital city of Italy. question: is rome in "
        "canada. answer:"
    )
    assert [e.gold for e in examples] == [True, False, True]


def test_first_n_items_only():
    assert len(load_nq(FIXTURES / "test-OpenDomainQA.jsonl", 2)) == 2
    assert len(load_rte(FIXTURES / "test-NLI.tsv", 1)) == 1


def test_bad_records_are_named(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(GeneralDataError, match="no field 'answer'"):
        load_gsm8k(path)
    path.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(GeneralDataError, match="####"):
        load_gsm8k(path)


# -- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "numbers"),
    [
        ("18", ["18"]),
        (" $1,000 per day", ["1000"]),
        ("1,234,567.5 and 2", ["1234567.5", "2"]),
        ("-3 degrees", ["-3"]),
        ("5-3", ["5", "3"]),  # a hyphen between numbers is not a sign
        ("is 18.", ["18"]),
        ("3.25 cups", ["3.25"]),
        ("12,34", ["12", "34"]),  # not a thousands group
        ("x18 or 7", ["7"]),  # glued to a word
        ("no numbers", []),
    ],
)
def test_extract_numbers(text, numbers):
    assert extract_numbers(text) == [Decimal(n) for n in numbers]


def test_gsm8k_gold_normalises_separators():
    assert gsm8k_gold("so 1,000 - 1 = 999\n#### 1,000") == Decimal(1000)
    assert gsm8k_gold("#### -2") == Decimal(-2)


def test_gsm8k_correct():
    assert gsm8k_correct(" 1000.", Decimal(1000))
    assert gsm8k_correct(" 1,000 dollars", Decimal(1000))
    assert gsm8k_correct(" 18.00", Decimal(18))
    assert gsm8k_correct(" the total: 9 then 18", Decimal(18))
    assert not gsm8k_correct(" 180", Decimal(18))
    assert not gsm8k_correct(" eighteen", Decimal(18))
    # At the token limit a trailing number may be cut short ("100" of "1000..."): ignored.
    assert gsm8k_correct(" 100", Decimal(100))
    assert not gsm8k_correct(" 100", Decimal(100), truncated=True)
    assert gsm8k_correct(" 100 and then 10", Decimal(100), truncated=True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  An  apple, a day ", "apple day"),
        ("May 18 , 2018", "may 18 2018"),
        ("Wilhelm Conrad Röntgen", "wilhelm conrad röntgen"),
        ("“Theatre” — the end.", "theatre end"),
        ("another answer", "another answer"),  # 'an' only as a whole word
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_span_match():
    assert span_match(" The answer is Paris, France.", ["Paris"])
    assert span_match(" in Paris", ["London", "paris"])
    assert span_match(" It was on May 18, 2018 in", ["May 18 , 2018"])
    assert span_match(" Glenn Gould plays", ["the Glenn Gould"])
    # Whole words only, in order and contiguous.
    assert not span_match(" Parisian", ["Paris"])
    assert not span_match(" Gould Glenn", ["Glenn Gould"])
    assert not span_match(" Glenn H. Gould", ["Glenn Gould"])
    # A gold answer that normalises to nothing matches nothing.
    assert not span_match(" the", ["The"])
    assert not span_match("", ["Paris"])


def test_parse_choice():
    assert parse_choice(" True", general.TRUE_FALSE) is True
    assert parse_choice("false.", general.TRUE_FALSE) is False
    assert parse_choice(" Yes", general.YES_NO) is True
    assert parse_choice(" no", general.YES_NO) is False
    assert parse_choice(" Tr", general.TRUE_FALSE) is None
    assert parse_choice("", general.YES_NO) is None
    assert parse_choice(" yes", general.TRUE_FALSE) is None


# -- scoring with scripted generations -------------------------------------------------------


def _scripted(outputs_by_prompt_part: dict[str, str], seen: list | None = None):
    """A stand-in for the greedy generation: the output for the first key found in the
    prompt; records the requested token counts."""

    def generate(model, tokenizer, prompts, max_new_tokens, batch_size):
        if seen is not None:
            seen.append(max_new_tokens)
        texts = []
        for prompt in prompts:
            texts.append(next(v for k, v in outputs_by_prompt_part.items() if k in prompt))
        return texts, [False] * len(prompts)

    return generate


def test_gsm8k_scoring(monkeypatch):
    seen: list[int] = []
    script = {"Ann": " 7 apples", "pens": " 1,000", "Tom": " 2 dollars"}
    monkeypatch.setattr(general.scoring, "_generate", _scripted(script, seen))
    result = general.score_gsm8k(None, None, load_gsm8k(FIXTURES / "test-reasoning.jsonl"))
    assert seen == [general.GSM8K_NEW_TOKENS]
    assert (result["correct"], result["n"]) == (2, 3)
    assert result["accuracy"] == pytest.approx(2 / 3)


def test_nq_scoring(monkeypatch):
    seen: list[int] = []
    script = {"capital": " Paris.", "piano": " Gould", "tower": ""}
    monkeypatch.setattr(general.scoring, "_generate", _scripted(script, seen))
    result = general.score_nq(None, None, load_nq(FIXTURES / "test-OpenDomainQA.jsonl"))
    assert seen == [general.NQ_NEW_TOKENS]
    assert (result["correct"], result["n"], result["empty"]) == (2, 3, 1)


def test_binary_generation_counts_invalid_answers(monkeypatch):
    # Gold: True, False, True, False.
    script = {"Paris is in": " True", "Rome": " True", "greeted": " maybe", "dog": " False"}
    monkeypatch.setattr(general.scoring, "_generate", _scripted(script))
    monkeypatch.setattr(
        general.scoring, "loglik_choices", lambda m, t, prompts, c, **k: [0] * len(prompts)
    )
    examples = load_rte(FIXTURES / "test-NLI.tsv")
    result = general.score_binary(None, None, examples, task="rte", details=True, one_pass=False)
    generated = result["generate"]
    assert (generated["valid"], generated["invalid"], generated["correct"]) == (3, 1, 2)
    assert generated["accuracy"] == pytest.approx(2 / 3)
    assert generated["accuracy_all"] == pytest.approx(2 / 4)
    assert [item["answer"] for item in generated["items"]] == [True, True, None, False]
    # Log-likelihood always choosing choice 0 (" True"): right on the two entailments.
    assert result["loglik"]["accuracy"] == pytest.approx(0.5)
    assert result["loglik"]["choices"] == [" True", " False"]


def test_no_valid_answer_gives_no_accuracy(monkeypatch):
    monkeypatch.setattr(general.scoring, "_generate", _scripted({"": " ?"}))
    examples = load_boolq(FIXTURES / "test-ClosedDomainQA.jsonl")
    result = general.scoring._score_generated_choice(None, None, examples, general.YES_NO, 4, False)
    assert result["accuracy"] is None and result["invalid"] == 3 and result["accuracy_all"] == 0


# -- log-likelihood choice -------------------------------------------------------------------


class Biased(nn.Module):
    """Logits that ignore the input: ``bias`` at every position."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.clone())

    def forward(self, input_ids, logits_to_keep=0, **_):
        keep = logits_to_keep or input_ids.shape[1]
        return SimpleNamespace(logits=self.bias.expand(input_ids.shape[0], keep, -1))


def test_loglik_choice_follows_controlled_logits(tiny_tokenizer):
    tok = tiny_tokenizer
    yes_ids = tok(" yes", add_special_tokens=False)["input_ids"]
    no_ids = tok(" no", add_special_tokens=False)["input_ids"]
    only_yes = sorted(set(yes_ids) - set(no_ids))
    only_no = sorted(set(no_ids) - set(yes_ids))
    assert only_yes and only_no
    prompts = ["Is Paris in France? answer:", "Is Rome in Canada? answer:"]
    bias = torch.zeros(len(tok))
    bias[only_yes] = 8.0
    assert loglik_choices(Biased(bias), tok, prompts, (" yes", " no")) == [0, 0]
    bias = torch.zeros(len(tok))
    bias[only_no] = 8.0
    assert loglik_choices(Biased(bias), tok, prompts, (" yes", " no")) == [1, 1]
    # A tie goes to the first choice.
    assert loglik_choices(Biased(torch.zeros(len(tok))), tok, prompts, (" no", " no")) == [0, 0]


def test_loglik_choice_matches_unbatched_scores(tiny_tokenizer):
    model = make_tiny_model("llama", tiny_tokenizer, seed=3)
    examples = load_rte(FIXTURES / "test-NLI.tsv")
    prompts = [e.prompt for e in examples]
    picks = loglik_choices(model, tiny_tokenizer, prompts, general.RTE_CHOICES, batch_size=3)
    true = score_one_by_one(model, tiny_tokenizer, prompts, [" True"] * len(prompts))
    false = score_one_by_one(model, tiny_tokenizer, prompts, [" False"] * len(prompts))
    assert picks == [0 if t.logprob >= f.logprob else 1 for t, f in zip(true, false, strict=True)]


# -- RTE and BoolQ from one pass ----------------------------------------------------------------

ANSWER_WORDS = (" True", " False", " yes", " no")


def _tokenizer_with_single_tokens(words: tuple[str, ...]):
    """The tiny tokenizer trained with ``words`` after ``answer:`` often enough that each
    is one token; the other answer words stay split."""
    extra = [f"answer:{w}" for w in words] * 20
    tok = make_tiny_tokenizer(TINY_VOCAB_SIZE + 20, extra)
    for word in ANSWER_WORDS:
        n = len(tok(word, add_special_tokens=False)["input_ids"])
        assert (n == 1) == (word in words), (word, n)
    return tok


@pytest.fixture(scope="module")
def one_token_answers():
    """Every answer word one token, as with SmolLM2's and Gemma's tokenizers."""
    return _tokenizer_with_single_tokens(ANSWER_WORDS)


@pytest.fixture(scope="module")
def half_split_answers():
    """`` True`` and `` yes`` one token, `` False`` and `` no`` several."""
    return _tokenizer_with_single_tokens((" True", " yes"))


class Steered(nn.Module):
    """A tiny model pushed, per row, towards its task's true answer, its false answer, or
    neither: a checksum of the row's tokens modulo 3 decides. RTE rows (those holding the token of
    `` True``, from "True or False?") are pushed towards `` True``/`` False``, the others
    towards `` yes``/`` no`` (a word of several tokens is not pushed). So some greedy
    answers are valid and some are not, for any route that runs the same rows."""

    def __init__(self, inner: nn.Module, tok, strength: float = 4.0) -> None:
        super().__init__()
        self.inner = inner
        ids = {w: tok(w, add_special_tokens=False)["input_ids"] for w in ANSWER_WORDS}
        self.words = {w: i[0] if len(i) == 1 else None for w, i in ids.items()}
        self.rte_marker = ids[" True"][0]
        self.strength = strength

    def forward(self, input_ids, attention_mask=None, **kwargs):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        bias = torch.zeros(input_ids.shape[0], out.logits.shape[-1])
        for row, (ids, keep) in enumerate(zip(input_ids, mask, strict=True)):
            real = ids[keep.bool()]
            pair = (" True", " False") if self.rte_marker in real else (" yes", " no")
            key = zlib.crc32(str(real.tolist()).encode()) % 3
            token = self.words[pair[key]] if key < 2 else None
            if token is not None:
                bias[row, token] = self.strength
        out.logits = out.logits + bias[:, None, :]
        return out


def _count_passes(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    return calls


def _model(kind: str, tok, steer: bool) -> nn.Module:
    model = make_tiny_model(kind, tok, seed=5)
    return Steered(model, tok) if steer else model


def _without(value, keys=("seconds", "shared_pass", "multi_token_items", "one_pass")):
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_without(v, keys) for v in value]
    return value


def _both_routes(model, tok, batch_size, tasks=("rte", "boolq")):
    """evaluate_general one-pass and through the two separate routes, with the number of
    forward passes each took."""
    calls = _count_passes(model)
    args = (model, tok, FIXTURES)
    kwargs = {"n_items": 10, "tasks": list(tasks), "batch_size": batch_size, "details": True}
    new = evaluate_general(*args, **kwargs)
    new_calls = len(calls)
    old = evaluate_general(*args, **kwargs, one_pass=False)
    return new, old, new_calls, len(calls) - new_calls


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_one_pass_gives_the_answers_of_both_routes_in_one_pass_per_batch(
    one_token_answers, kind, batch_size
):
    tok = one_token_answers
    new, old, new_calls, old_calls = _both_routes(_model(kind, tok, True), tok, batch_size)
    assert _without(new) == _without(old)
    # The fixture exercises valid and invalid answers, right and wrong ones.
    generated = [new["tasks"][t]["generate"] for t in ("rte", "boolq")]
    assert sum(g["invalid"] for g in generated) > 0 and sum(g["valid"] for g in generated) > 0
    answers = [i["answer"] for g in generated for i in g["items"]]
    assert {True, False, None} <= set(answers)
    loglik = [i["correct"] for t in ("rte", "boolq") for i in new["tasks"][t]["loglik"]["items"]]
    assert True in loglik and False in loglik
    # 4 RTE and 3 BoolQ items: one pass per batch, where the two routes took two.
    batches = math.ceil(4 / batch_size) + math.ceil(3 / batch_size)
    assert (new_calls, old_calls) == (batches, 2 * batches)
    for task in ("rte", "boolq"):
        result = new["tasks"][task]
        assert result["one_pass"] and result["loglik"]["multi_token_items"] == 0
        assert result["generate"]["shared_pass"] and result["loglik"]["shared_pass"]
        shared = result["generate"]["seconds"]
        assert 0 < shared <= result["seconds"]
        assert result["loglik"]["seconds"] == shared  # no passes of its own
        assert "one_pass" not in old["tasks"][task]


@pytest.mark.parametrize("kind", ["gemma3_text", "qwen2"])
def test_one_pass_on_unsteered_models(one_token_answers, kind):
    tok = one_token_answers
    new, old, new_calls, old_calls = _both_routes(_model(kind, tok, False), tok, 3)
    assert _without(new) == _without(old)
    assert (new_calls, old_calls) == (2 + 1, 2 * (2 + 1))


@pytest.mark.parametrize("which", ["half_split", "all_split"])
def test_answers_of_several_tokens_fall_back_to_the_teacher_forced_route(
    which, half_split_answers, tiny_tokenizer
):
    tok = half_split_answers if which == "half_split" else tiny_tokenizer
    new, old, new_calls, old_calls = _both_routes(_model("llama", tok, True), tok, 2)
    assert _without(new) == _without(old)
    for task, n in (("rte", 4), ("boolq", 3)):
        assert new["tasks"][task]["loglik"]["multi_token_items"] == n
    # The generated token still comes from the shared pass; the choice takes the
    # teacher-forced passes it took before.
    assert new_calls == old_calls
    for task in ("rte", "boolq"):
        # Every choice came from the separate route: its time, not the shared passes'.
        loglik, generate = new["tasks"][task]["loglik"], new["tasks"][task]["generate"]
        assert generate["shared_pass"] and not loglik["shared_pass"]
        assert 0 < loglik["seconds"] < new["tasks"][task]["seconds"] - generate["seconds"]
    if which == "half_split":  # " True" and " yes" can still be generated
        answers = {
            i["answer"] for t in ("rte", "boolq") for i in new["tasks"][t]["generate"]["items"]
        }
        assert True in answers


def test_one_pass_choice_follows_controlled_logits(one_token_answers):
    tok = one_token_answers
    yes, no = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" yes", " no"))
    prompts = ["Is Paris in France? answer:", "Is Rome in Canada? answer:"]
    choices = general.BOOLQ_CHOICES
    bias = torch.zeros(len(tok))
    bias[yes] = 8.0
    assert general.one_pass_choices(Biased(bias), tok, prompts, choices) == (
        [" yes", " yes"], [0, 0], []
    )  # fmt: skip
    bias = torch.zeros(len(tok))
    bias[no] = 8.0
    assert general.one_pass_choices(Biased(bias), tok, prompts, choices) == (
        [" no", " no"], [1, 1], []
    )  # fmt: skip
    # Flat logits: the argmax is token 0, the end of sequence, an empty answer (as the
    # generation gives); a tie goes to the first choice.
    flat = Biased(torch.zeros(len(tok)))
    assert tok.eos_token_id == 0
    assert general.one_pass_choices(flat, tok, prompts, (" no", " no")) == (["", ""], [0, 0], [])


def test_only_the_prompts_with_a_long_answer_fall_back(one_token_answers, monkeypatch):
    """Whether an answer is one token is decided per prompt (in context): as if the
    answers of two RTE prompts were two tokens long, those two go the separate route."""
    tok = one_token_answers
    examples = load_rte(FIXTURES / "test-NLI.tsv")
    long_ones = {examples[1].prompt, examples[3].prompt}
    real = general.scoring.target_token_ids

    def split_some(tokenizer, prompt, target, **kwargs):
        ids = real(tokenizer, prompt, target, **kwargs)
        return ids * 2 if prompt in long_ones else ids

    monkeypatch.setattr(general.scoring, "target_token_ids", split_some)
    model = _model("llama", tok, True)
    new, old, new_calls, old_calls = _both_routes(model, tok, 2, tasks=("rte",))
    assert _without(new) == _without(old)
    rte = new["tasks"]["rte"]
    assert rte["loglik"]["multi_token_items"] == 2 and rte["loglik"]["shared_pass"]
    assert rte["loglik"]["seconds"] > rte["generate"]["seconds"]  # shared + its own passes
    assert (new_calls, old_calls) == (2 + 1, 2 + 2)
    texts, picks, fallback = general.one_pass_choices(
        model, tok, [e.prompt for e in examples], general.RTE_CHOICES, batch_size=2
    )
    assert fallback == [1, 3]
    assert picks == loglik_choices(model, tok, [e.prompt for e in examples], general.RTE_CHOICES)
    assert texts == general.scoring._generate(model, tok, [e.prompt for e in examples], 1, 2)[0]


# -- end to end on a tiny model ---------------------------------------------------------------


def _strip_seconds(value):
    if isinstance(value, dict):
        return {k: _strip_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_strip_seconds(v) for v in value]
    return value


def test_evaluate_general_on_a_tiny_model(tiny_tokenizer):
    model = make_tiny_model("gpt2", tiny_tokenizer, seed=1)
    result = evaluate_general(model, tiny_tokenizer, FIXTURES, n_items=3, batch_size=2)
    json.dumps(result, allow_nan=False)
    assert set(result["tasks"]) == {"gsm8k", "rte", "nq", "boolq"}
    summary = result["summary"]
    for key in ("gsm8k_acc", "nq_acc", "rte_loglik_acc", "boolq_loglik_acc"):
        assert 0.0 <= summary[key] <= 1.0
    for task in ("rte", "boolq"):
        generated = result["tasks"][task]["generate"]
        assert generated["valid"] + generated["invalid"] == generated["n"] == 3
        assert summary[f"{task}_generate_invalid"] == generated["invalid"]
    assert result["tasks"]["gsm8k"]["max_new_tokens"] == general.GSM8K_NEW_TOKENS
    assert all(result["tasks"][t]["seconds"] >= 0 for t in ("gsm8k", "nq"))
    assert result["n_items"] == 3


def test_batch_size_does_not_change_the_results(tiny_tokenizer):
    model = make_tiny_model("llama", tiny_tokenizer, seed=2)
    args = (model, tiny_tokenizer, FIXTURES)
    one = evaluate_general(*args, n_items=4, batch_size=1, details=True)
    many = evaluate_general(*args, n_items=4, batch_size=4, details=True)
    assert _strip_seconds(one) == _strip_seconds(many)
    assert len(one["tasks"]["nq"]["items"]) == 3


def test_task_selection_and_errors(tiny_tokenizer, tmp_path, monkeypatch):
    model = make_tiny_model("llama", tiny_tokenizer)
    result = evaluate_general(model, tiny_tokenizer, FIXTURES, n_items=2, tasks=["boolq"])
    assert list(result["tasks"]) == ["boolq"]
    assert set(result["summary"]) == {
        "boolq_generate_acc", "boolq_generate_acc_all", "boolq_generate_invalid",
        "boolq_loglik_acc",
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown"):
        evaluate_general(model, tiny_tokenizer, FIXTURES, tasks=["mmlu"])
    with pytest.raises(GeneralDataError, match="does not exist"):
        evaluate_general(model, tiny_tokenizer, tmp_path, tasks=["rte"])
    # A per-task file overrides the folder.
    result = evaluate_general(
        model, tiny_tokenizer, tmp_path, tasks="rte", n_items=2,
        paths={"rte": FIXTURES / "test-NLI.tsv"},
    )  # fmt: skip
    assert result["tasks"]["rte"]["n"] == 2


def test_a_new_task_is_one_table_entry(tiny_tokenizer, monkeypatch):
    # A task added to the table alone is accepted by name, loaded from its file in the data
    # folder and scored by its own scorer, which gets the evaluation's settings.
    seen = {}

    def score(model, tokenizer, examples, *, batch_size, details, one_pass):
        seen.update(prompts=[e.prompt for e in examples], batch_size=batch_size)
        seen.update(details=details, one_pass=one_pass)
        return {"accuracy": sum(e.gold for e in examples) / len(examples)}

    task = general.GeneralTask(
        "rte_copy", "test-NLI.tsv", general.load_rte, general.rte_prompt,
        general.parse_choice, score,
    )  # fmt: skip
    monkeypatch.setitem(general.TASK_TABLE, "rte_copy", task)
    model = make_tiny_model("llama", tiny_tokenizer)
    result = evaluate_general(
        model, tiny_tokenizer, FIXTURES, n_items=3, tasks="rte_copy", batch_size=5,
        one_pass=False,
    )  # fmt: skip
    examples = load_rte(FIXTURES / "test-NLI.tsv", 3)
    assert seen == {
        "prompts": [e.prompt for e in examples], "batch_size": 5, "details": False,
        "one_pass": False,
    }  # fmt: skip
    assert result["summary"] == {"rte_copy_acc": sum(e.gold for e in examples) / 3}
    assert result["files"] == {"rte_copy": str(FIXTURES / "test-NLI.tsv")}


def test_the_table_declares_each_task_once():
    assert general.TASKS == ("gsm8k", "rte", "nq", "boolq")
    for name, task in general.TASK_TABLE.items():
        assert task.name == name
        assert general.TASK_FILES[name] == task.file and general.LOADERS[name] is task.load
    assert general.TASK_TABLE["rte"].choices == general.RTE_CHOICES
    assert general.TASK_TABLE["boolq"].words == general.YES_NO


def test_resolve_data_dir(tmp_path, monkeypatch):
    (tmp_path / "general").mkdir()
    assert resolve_data_dir(tmp_path) == tmp_path / "general"
    assert resolve_data_dir(tmp_path / "general") == tmp_path / "general"
    monkeypatch.setenv(general.DATA_ENV, str(tmp_path))
    assert resolve_data_dir() == tmp_path / "general"
    monkeypatch.delenv(general.DATA_ENV)
    with pytest.raises(GeneralDataError, match=general.DATA_ENV):
        resolve_data_dir()
    with pytest.raises(GeneralDataError, match="does not exist"):
        resolve_data_dir(tmp_path / "missing")


# -- lm-evaluation-harness -------------------------------------------------------------------


def test_lm_eval_adapter_on_a_local_task(tiny_tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = FIXTURES / "lm_eval"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    template = (source / "tiny_yesno.yaml.in").read_text(encoding="utf-8")
    (tasks / "tiny_yesno.yaml").write_text(
        template.format(data_file=source / "tiny_yesno.jsonl", cache_dir=tmp_path / "cache"),
        encoding="utf-8",
    )
    model = make_tiny_model("llama", tiny_tokenizer)
    with torch.random.fork_rng(devices=[]):  # simple_evaluate seeds the global RNGs
        result = general.lm_eval_evaluate(
            model, tiny_tokenizer, ["tiny_yesno"], include_path=tasks,
            include_defaults=False, batch_size=4,
        )  # fmt: skip
    json.dumps(result)
    metrics = result["results"]["tiny_yesno"]
    assert 0.0 <= metrics["acc,none"] <= 1.0
    assert result["n-samples"]["tiny_yesno"]["effective"] == 4
    # The harness's choice must agree with ours: the larger total log-probability.
    from sphere_edit.evaluation.scoring import score_targets

    records = [json.loads(line) for line in (source / "tiny_yesno.jsonl").read_text().splitlines()]
    prompts = [f"Question: {r['question']}\nAnswer:" for r in records]
    yes = score_targets(model, tiny_tokenizer, prompts, [" yes"] * 4)
    no = score_targets(model, tiny_tokenizer, prompts, [" no"] * 4)
    ours = [
        (0 if y.logprob > n.logprob else 1) == r["label"]
        for y, n, r in zip(yes, no, records, strict=True)
    ]
    assert metrics["acc,none"] == pytest.approx(sum(ours) / 4)


def test_lm_eval_missing_gives_a_clear_error(monkeypatch, tiny_tokenizer):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(ImportError, match="pip install 'lm-eval"):
        general.lm_eval_evaluate(nn.Linear(1, 1), tiny_tokenizer, ["x"])


# -- command line ----------------------------------------------------------------------------


def test_cli_general_on_a_model_folder(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("SPHERE_EDIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    make_tiny_model("llama", tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    out = tmp_path / "general.json"
    args = ["general", str(folder), "--data", str(FIXTURES), "--n-items", "2",
            "--tasks", "rte,gsm8k", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "rte_loglik_acc" in result.output
    saved = json.loads(out.read_text())
    assert set(saved["tasks"]) == {"rte", "gsm8k"} and saved["tasks"]["rte"]["n"] == 2
    bad = CliRunner().invoke(app, ["general", str(folder), "--data", str(FIXTURES),
                                   "--tasks", "mmlu"])  # fmt: skip
    assert bad.exit_code == 2 and "unknown" in bad.output
