"""Batched teacher-forced scoring and greedy completion (sphere_edit.evaluation.scoring)."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sphere_edit.editing.text import encode, target_token_ids
from sphere_edit.evaluation.scoring import (
    TargetScore,
    compare_targets,
    greedy_completion,
    greedy_token_ids,
    length_batches,
    next_token_scores,
    score_one_by_one,
    score_targets,
    shared_runs,
)

# Prompts of different lengths and targets of one to several tokens, so that batches mix
# padding widths and numbers of kept positions.
PAIRS = [
    ("Paris is the capital of", "France"),
    ("Miles Davis plays the", "trumpet"),
    ("The Eiffel Tower is located in", "Rome"),
    ("Toronto", "is located in Canada"),
    ("Glenn Gould plays the", "piano every morning"),
    ("The official language of Italy is", "Italian"),
    ("x", "Zebraland"),
    ("What is the capital of France? The answer is", "Paris"),
    ("Lionel Messi plays", "hockey"),
    # Rows that are prefixes of other rows, so that passes are shared (see the test below).
    ("Paris is the capital of", "Germany and France"),
    ("Toronto", "is located"),
]


def _prompts_targets():
    return [p for p, _ in PAIRS], [t for _, t in PAIRS]


@pytest.mark.parametrize("share_prefixes", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batched_scores_equal_one_by_one(tiny_model, batch_size, share_prefixes):
    model, tok = tiny_model
    prompts, targets = _prompts_targets()
    batched = score_targets(
        model, tok, prompts, targets, batch_size=batch_size, share_prefixes=share_prefixes
    )
    reference = score_one_by_one(model, tok, prompts, targets)
    assert len(batched) == len(reference) == len(PAIRS)
    for got, want, (prompt, target) in zip(batched, reference, PAIRS, strict=True):
        assert got.n_tokens == want.n_tokens == len(target_token_ids(tok, prompt, target))
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert got.mean_logprob == pytest.approx(want.mean_logprob, abs=1e-4)
        assert got.top1 == want.top1
        assert got.token_logprobs == pytest.approx(want.token_logprobs, abs=1e-4)
        assert got.logprob <= 0
        assert got.mean_logprob == pytest.approx(got.logprob / got.n_tokens)


def test_rows_that_are_prefixes_of_other_rows_share_their_pass(tiny_model):
    _, tok = tiny_model
    prompts, targets = _prompts_targets()
    rows = [encode(tok, p) + target_token_ids(tok, p, t)[:-1] for p, t in PAIRS]
    runs, owner = shared_runs(rows)
    assert len(runs) < len(rows)  # the fixture does exercise the sharing
    for row, run in zip(rows, owner, strict=True):
        assert runs[run][: len(row)] == row
    for a, b in itertools.permutations(runs, 2):
        assert a != b[: len(a)], "a run is itself a prefix of another run"
    assert shared_runs([[1, 2], [1, 2], [3]]) == ([[1, 2], [3]], [0, 0, 1])


def test_scores_keep_input_order_and_handle_duplicates(tiny_model):
    model, tok = tiny_model
    prompts, targets = _prompts_targets()
    forward = score_targets(model, tok, prompts, targets, batch_size=4)
    backward = score_targets(model, tok, prompts[::-1], targets[::-1], batch_size=4)
    for a, b in zip(forward, backward[::-1], strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    twice = score_targets(model, tok, [prompts[0]] * 2, [targets[0]] * 2)
    assert twice[0].logprob == pytest.approx(twice[1].logprob, abs=1e-5)


def test_compare_targets_matches_scores(tiny_model):
    model, tok = tiny_model
    prompts = [p for p, _ in PAIRS[:4]]
    new = ["Italy", "guitar", "Paris", "Japan"]
    old = ["France", "trumpet", "Rome", "Canada"]
    comparisons = compare_targets(model, tok, prompts, new, old, batch_size=3)
    new_ref = score_one_by_one(model, tok, prompts, new)
    old_ref = score_one_by_one(model, tok, prompts, old)
    for c, n, o in zip(comparisons, new_ref, old_ref, strict=True):
        assert c.new.logprob == pytest.approx(n.logprob, abs=1e-4)
        assert c.old.logprob == pytest.approx(o.logprob, abs=1e-4)
        assert c.new.top1 == n.top1 and c.old.top1 == o.top1
        assert c.new_more_likely == (n.logprob > o.logprob)
        assert c.new_more_likely_per_token == (n.mean_logprob > o.mean_logprob)
    # One string stands for every prompt.
    same = compare_targets(model, tok, prompts, "Italy", "France")
    assert [c.new.n_tokens for c in same] == [same[0].new.n_tokens] * len(prompts)


def _greedy_reference(model, tok, prompt, max_new_tokens):
    """Greedy decoding of one prompt, re-running the whole unpadded sequence each step."""
    ids = encode(tok, prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + out]), use_cache=False).logits
            token = int(logits[0, -1].argmax())
            if token == tok.eos_token_id:
                break
            out.append(token)
    return out


@pytest.mark.parametrize("batch_size", [4])
def test_greedy_batched_equals_unbatched(tiny_model, batch_size):
    model, tok = tiny_model
    prompts = [p for p, _ in PAIRS]
    got = greedy_token_ids(model, tok, prompts, max_new_tokens=6, batch_size=batch_size)
    want = [_greedy_reference(model, tok, p, 6) for p in prompts]
    assert got == want
    texts = greedy_completion(model, tok, prompts, max_new_tokens=6, batch_size=batch_size)
    assert texts == [tok.decode(ids, skip_special_tokens=True) for ids in want]


def test_greedy_first_token_is_top1_under_scoring(tiny_model):
    """A one-token target equal to the greedy next token is top-1 when scored."""
    model, tok = tiny_model
    prompts = [p for p, _ in PAIRS]
    first = greedy_token_ids(model, tok, prompts, max_new_tokens=1)
    checked = 0
    for prompt, ids in zip(prompts, first, strict=True):
        if not ids:
            continue
        target = tok.decode(ids)
        if target_token_ids(tok, prompt, target) != ids:
            continue  # the token does not round-trip through text in this context
        (score,) = score_targets(model, tok, [prompt], [target])
        assert score.top1
        checked += 1
    assert checked >= 1


# -- a model whose logits are known exactly ----------------------------------------------


class BigramLM(nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: the next token depends on the last one only,
    so every score can be computed by hand from ``table``."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.clone(), requires_grad=False)
        self.config = SimpleNamespace(vocab_size=table.shape[0])
        self.calls: list[dict] = []

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        logits_to_keep=0,
        use_cache=False,
        cache=None,
    ):
        self.calls.append(
            {"shape": tuple(input_ids.shape), "keep": logits_to_keep, "positions": position_ids}
        )
        logits = self.table[input_ids]
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits, cache=None, past_key_values=None)


def _log_softmax_at(row: torch.Tensor, index: int) -> float:
    values = [float(x) for x in row]
    return values[index] - math.log(sum(math.exp(v) for v in values))


def test_hand_checked_scores_and_top1(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt, target = "x", "Zebraland"
    prompt_ids = encode(tok, prompt)
    ids = target_token_ids(tok, prompt, target)
    chain = [prompt_ids[-1], *ids]
    assert len(ids) >= 3 and len(set(chain)) == len(chain), "the test needs distinct tokens"
    vocab = len(tok)
    table = torch.zeros(vocab, vocab)
    for prev, nxt in zip(chain, chain[1:], strict=False):
        table[prev, nxt] = 4.0
    model = BigramLM(table)

    (score,) = score_targets(model, tok, [prompt], [target])
    step = 4.0 - math.log(math.exp(4.0) + vocab - 1)
    assert score.n_tokens == len(ids)
    assert score.top1 is True
    assert score.logprob == pytest.approx(len(ids) * step, abs=1e-5)
    assert score.mean_logprob == pytest.approx(step, abs=1e-6)
    # The unembedding ran only at the positions predicting target tokens.
    assert model.calls[-1]["keep"] == len(ids)
    assert model.calls[-1]["shape"] == (1, len(prompt_ids) + len(ids) - 1)

    # Make one later token lose to another: still likely, but no longer top-1.
    a, b = ids[0], ids[1]
    rival = next(t for t in range(vocab) if t not in chain and t != tok.eos_token_id)
    table[a, rival] = 5.0
    model = BigramLM(table)
    (score,) = score_targets(model, tok, [prompt], [target])
    assert score.top1 is False
    assert score.token_logprobs[0] == pytest.approx(step, abs=1e-5)
    assert score.token_logprobs[1] == pytest.approx(_log_softmax_at(table[a], b), abs=1e-5)
    assert score.logprob == pytest.approx(
        (len(ids) - 1) * step + _log_softmax_at(table[a], b), abs=1e-5
    )

    # Greedy decoding follows the rival; the rival's row is all zeros, so its argmax is
    # token 0, the end-of-sequence token, and decoding stops there.
    assert tok.eos_token_id == 0
    assert greedy_token_ids(model, tok, [prompt], max_new_tokens=5) == [[a, rival]]


def test_bigram_batches_mix_lengths(tiny_tokenizer):
    """Padding columns never reach the scored positions, whatever the row lengths."""
    tok = tiny_tokenizer
    torch.manual_seed(0)
    model = BigramLM(torch.randn(len(tok), len(tok)))
    prompts, targets = _prompts_targets()
    batched = score_targets(model, tok, prompts, targets, batch_size=5)
    reference = score_one_by_one(model, tok, prompts, targets)
    for got, want in zip(batched, reference, strict=True):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert got.top1 == want.top1
    widths = [call["shape"][1] for call in model.calls[:2]]
    assert widths == sorted(widths)  # rows sorted by length before batching


def test_top1_with_greedy_on_bigram(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt, target = "x", "Zebraland"
    ids = target_token_ids(tok, prompt, target)
    chain = [encode(tok, prompt)[-1], *ids]
    table = torch.zeros(len(tok), len(tok))
    for prev, nxt in zip(chain, chain[1:], strict=False):
        table[prev, nxt] = 3.0
    table[ids[-1], tok.eos_token_id] = 3.0  # stop right after the target
    model = BigramLM(table)
    assert greedy_token_ids(model, tok, [prompt], max_new_tokens=20) == [ids]
    assert greedy_completion(model, tok, [prompt], max_new_tokens=20) == [tok.decode(ids)]
    assert score_targets(model, tok, [prompt], [target])[0].top1


# -- the last position alone: greedy token and one-token candidates ---------------------------


def _one_token_targets(tok, prompt):
    """Targets that are one token after ``prompt`` (in context), with their ids."""
    words = [" the", " is", " Paris", " in", " France", " plays", " of", " city"]
    found = {}
    for word in words:
        ids = target_token_ids(tok, prompt, word)
        if len(ids) == 1:
            found[word] = ids[0]
    return found


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_next_token_scores_equal_greedy_and_teacher_forced_scores(tiny_model, batch_size):
    model, tok = tiny_model
    prompts = list(dict.fromkeys(p for p, _ in PAIRS))  # distinct prompts
    targets = [_one_token_targets(tok, p) for p in prompts]
    assert all(len(t) >= 3 for t in targets)
    candidates = [list(t.values()) for t in targets]
    calls = []
    hook = model.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        got = next_token_scores(model, tok, prompts, candidates, batch_size=batch_size)
    finally:
        hook.remove()
    assert len(calls) == math.ceil(len(prompts) / batch_size)  # one pass per batch
    greedy = greedy_token_ids(model, tok, prompts, max_new_tokens=1, batch_size=batch_size)
    assert [list(s.greedy) for s in got] == greedy
    assert all(s.greedy in ((s.argmax,), ()) for s in got)
    # score_targets runs these rows (the prompts) in the same batches: the same numbers.
    rows = [p for p, t in zip(prompts, targets, strict=True) for _ in t]
    words = [w for t in targets for w in t]
    batched = iter(score_targets(model, tok, rows, words, batch_size=batch_size))
    for score, prompt, wanted in zip(got, prompts, targets, strict=True):
        assert list(score.logprobs) == [next(batched).logprob for _ in wanted]
        reference = score_one_by_one(model, tok, [prompt] * len(wanted), list(wanted))
        assert score.logprobs == pytest.approx([r.logprob for r in reference], abs=1e-5)


def test_next_token_scores_by_hand(tiny_tokenizer):
    """On the bigram model: the unembedding runs at the last position only, the greedy
    token is the argmax unless it is the end of sequence, the log-probabilities are the
    log-softmax of the last token's row."""
    tok = tiny_tokenizer
    prompts = ["x", "Paris is the capital of", "Toronto"]
    rows = [encode(tok, p) for p in prompts]
    lasts = [row[-1] for row in rows]
    assert len(set(lasts)) == 3
    table = torch.zeros(len(tok), len(tok))
    table[lasts[0], 7] = 3.0
    table[lasts[1], tok.eos_token_id] = 3.0  # greedy decoding stops at once
    table[lasts[2], 9] = 1.0
    table[lasts[2], 11] = 2.0
    model = BigramLM(table)
    got = next_token_scores(model, tok, prompts, [[7, 9], [], [9, 11, 9]], batch_size=2)
    assert [c["keep"] for c in model.calls] == [1, 1]  # one pass per batch, last position
    # Shortest rows first: "x" and "Toronto", then the longest prompt alone.
    assert [c["shape"][0] for c in model.calls] == [2, 1]
    assert [s.argmax for s in got] == [7, tok.eos_token_id, 11]
    assert [s.greedy for s in got] == [(7,), (), (11,)]
    assert greedy_token_ids(model, tok, prompts, max_new_tokens=1) == [[7], [], [11]]
    assert got[0].logprobs == pytest.approx(
        [_log_softmax_at(table[lasts[0]], 7), _log_softmax_at(table[lasts[0]], 9)], abs=1e-6
    )
    assert got[1].logprobs == ()
    lp9, lp11 = (_log_softmax_at(table[lasts[2]], t) for t in (9, 11))
    assert got[2].logprobs == pytest.approx([lp9, lp11, lp9], abs=1e-6)


def test_length_batches():
    rows = [[1, 2, 3], [1], [1, 2], [4], [5, 6, 7, 8]]
    assert list(length_batches(rows, 2)) == [[1, 3], [2, 0], [4]]
    assert list(length_batches([], 3)) == []


def test_next_token_scores_input_validation(tiny_model):
    model, tok = tiny_model
    assert next_token_scores(model, tok, [], []) == []
    with pytest.raises(ValueError, match="one per prompt"):
        next_token_scores(model, tok, ["a", "b"], [[1]])
    with pytest.raises(ValueError, match="batch_size"):
        next_token_scores(model, tok, ["a"], [[1]], batch_size=0)
    with pytest.raises(TypeError):
        next_token_scores(model, tok, "Paris is", [[1]])
    with pytest.raises(ValueError, match="tokenises to nothing"):
        next_token_scores(model, tok, [""], [[1]])


def test_input_validation(tiny_model):
    model, tok = tiny_model
    assert score_targets(model, tok, [], []) == []
    assert greedy_token_ids(model, tok, [], max_new_tokens=3) == []
    with pytest.raises(ValueError, match="one target per prompt"):
        score_targets(model, tok, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="batch_size"):
        score_targets(model, tok, ["a"], ["c"], batch_size=0)
    with pytest.raises(TypeError):
        score_targets(model, tok, "Paris is", ["France"])
    with pytest.raises(ValueError, match="tokenises to nothing"):
        score_targets(model, tok, [""], ["France"])
    with pytest.raises(ValueError, match="new targets"):
        compare_targets(model, tok, ["a", "b"], ["c"], ["d", "e"])
    assert isinstance(score_targets(model, tok, ["a"], ["c"])[0], TargetScore)


def test_unembedding_runs_only_at_the_scored_positions(tiny_model):
    model, tok = tiny_model
    prompts, targets = _prompts_targets()
    seen: list[int] = []
    unembed = model.get_output_embeddings()
    hook = unembed.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[-2]))
    try:
        got = score_targets(model, tok, prompts, targets, batch_size=4)
    finally:
        hook.remove()
    # One position per distinct (run, position) pair: the shared rows add none.
    distinct = set()
    runs, owner = shared_runs([encode(tok, p) + target_token_ids(tok, p, t)[:-1]
                               for p, t in PAIRS])  # fmt: skip
    for i, (prompt, target) in enumerate(PAIRS):
        n = len(target_token_ids(tok, prompt, target))
        end = len(encode(tok, prompt)) + n - 1  # row length; it predicts from end - n
        distinct.update((owner[i], end - n + k) for k in range(n))
    assert sum(seen) == len(distinct) < sum(s.n_tokens for s in got)
    reference = score_one_by_one(model, tok, prompts, targets)
    assert [s.logprob for s in got] == pytest.approx([r.logprob for r in reference], abs=1e-5)
