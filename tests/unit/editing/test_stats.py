"""Key statistics C0 = E[k kᵀ]: against a naive per-token computation, and their cache."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sphere_edit.editing.stats as stats
from sphere_edit.editing.stats import (
    Corpus,
    CorpusError,
    SecondMoment,
    StatsRecipe,
    add_gram,
    collect_second_moments,
    layer_second_moments,
    load_corpus,
    stats_cache_path,
)
from sphere_edit.model.loading import LoadedModel
from tests.tiny_models import TINY_INTERMEDIATE, TRAINING_SENTENCES, make_tiny_model
from tests.unit._helpers import mlp_out_module

TEXTS = list(TRAINING_SENTENCES[:12])


def _corpus(texts: list[str], tag: str = "test") -> Corpus:
    return Corpus(texts=texts, fingerprint=f"{tag}-fingerprint-0123456789", description=tag)


@torch.no_grad()
def _naive_moments(model, pieces: list[list[int]], layers: list[int]) -> dict[int, SecondMoment]:
    """Run every piece alone and add k kᵀ of every token's key, one token at a time."""
    d = TINY_INTERMEDIATE
    result = {layer: SecondMoment(torch.zeros(d, d, dtype=torch.float64), 0) for layer in layers}
    for piece in pieces:
        seen: dict[int, torch.Tensor] = {}

        def keep(layer: int, seen=seen):
            return lambda _module, args: seen.__setitem__(layer, args[0][0].double())

        handles = [
            mlp_out_module(model, layer).register_forward_pre_hook(keep(layer)) for layer in layers
        ]
        try:
            model(input_ids=torch.tensor([piece]))
        finally:
            for handle in handles:
                handle.remove()
        for layer in layers:
            for key in seen[layer]:
                result[layer].total += torch.outer(key, key)
                result[layer].count += 1
    return result


def _assert_moments_equal(got: dict[int, SecondMoment], expected: dict[int, SecondMoment]):
    assert set(got) == set(expected)
    for layer, moment in expected.items():
        assert got[layer].count == moment.count
        assert got[layer].total.dtype == torch.float64
        torch.testing.assert_close(got[layer].total, moment.total, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[layer].moment, moment.total / moment.count)


def test_collect_second_moments_equals_naive(tiny_model):
    model, tok = tiny_model
    pieces = [tok(text)["input_ids"] for text in TEXTS]
    # Small passes: several batches, each right-padded to its longest piece.
    got = collect_second_moments(
        model, tok, [1, 3], _corpus(TEXTS), max_tokens=10_000, tokens_per_pass=40, progress=False
    )
    _assert_moments_equal(got, _naive_moments(model, pieces, [1, 3]))
    assert got[1].count == sum(len(p) for p in pieces)


def test_collect_second_moments_budget_and_piece_length(tiny_tokenizer):
    model = make_tiny_model("gpt2", tiny_tokenizer)
    tok = tiny_tokenizer
    first, second = (tok(t)["input_ids"] for t in TEXTS[7:9])
    assert len(first) > 6 and len(second) > 6
    # Pieces of at most 4 tokens, each run on its own (positions restart), and the token
    # budget ends inside the second text.
    budget = len(first) + 3
    got = collect_second_moments(
        model,
        tok,
        [2],
        _corpus(TEXTS[7:9]),
        max_tokens=budget,
        recipe=StatsRecipe(piece_tokens=4),
        progress=False,
    )
    pieces = [first[i : i + 4] for i in range(0, len(first), 4)]
    pieces = [p for p in pieces if len(p) >= 2] + [second[:3]]
    assert sum(len(p) for p in pieces) <= budget
    _assert_moments_equal(got, _naive_moments(model, pieces, [2]))


def test_collect_second_moments_rejects_an_empty_corpus(tiny_tokenizer):
    model = make_tiny_model("llama", tiny_tokenizer)
    with pytest.raises(CorpusError, match="no token sequences of length 2"):
        collect_second_moments(
            model,
            tiny_tokenizer,
            [1],
            _corpus(["A"]),
            max_tokens=100,
            recipe=StatsRecipe(piece_tokens=256),
            progress=False,
        )
    with pytest.raises(CorpusError, match="no token sequences of length 1"):
        collect_second_moments(
            model, tiny_tokenizer, [1], _corpus([""]), max_tokens=100, progress=False
        )


# -- the cache ---------------------------------------------------------------------------------


@pytest.fixture
def loaded_llama(tiny_tokenizer, monkeypatch, tmp_path):
    monkeypatch.setenv("SPHERE_EDIT_CACHE", str(tmp_path / "cache"))
    model = make_tiny_model("llama", tiny_tokenizer)
    return LoadedModel(model=model, tokenizer=tiny_tokenizer, name="tiny-llama")


class _CountingCollect:
    def __init__(self):
        self.calls: list[list[int]] = []
        self._real = stats.collect_second_moments

    def __call__(self, model, tokenizer, layers, corpus, **kwargs):
        self.calls.append(list(layers))
        return self._real(model, tokenizer, layers, corpus, **kwargs)


def _fail(*_args, **_kwargs):
    raise AssertionError("the statistics were recomputed although the cache is valid")


def test_layer_second_moments_uses_the_cache(loaded_llama, monkeypatch, tmp_path):
    corpus = _corpus(TEXTS)
    counting = _CountingCollect()
    monkeypatch.setattr(stats, "collect_second_moments", counting)
    first = layer_second_moments(loaded_llama, [1, 2], corpus, max_tokens=60, progress=False)
    assert counting.calls == [[1, 2]]
    path = stats_cache_path(loaded_llama.fingerprint, corpus.fingerprint, 1, 60, "float32")
    assert path.exists()
    assert path.is_relative_to(tmp_path / "cache")

    monkeypatch.setattr(stats, "collect_second_moments", _fail)
    again = layer_second_moments(loaded_llama, [1, 2], corpus, max_tokens=60, progress=False)
    for layer in (1, 2):
        assert torch.equal(again[layer].total, first[layer].total)
        assert again[layer].count == first[layer].count == 60

    # Only the missing layer is computed.
    monkeypatch.setattr(stats, "collect_second_moments", counting)
    mixed = layer_second_moments(loaded_llama, [2, 3], corpus, max_tokens=60, progress=False)
    assert counting.calls[-1] == [3]
    assert list(mixed) == [2, 3]
    assert torch.equal(mixed[2].total, first[2].total)


@pytest.mark.parametrize("field", ["model", "corpus", "tokens", "dtype", "layer"])
def test_layer_second_moments_recomputes_on_metadata_mismatch(loaded_llama, monkeypatch, field):
    corpus = _corpus(TEXTS)
    first = layer_second_moments(loaded_llama, [1], corpus, max_tokens=40, progress=False)
    path = stats_cache_path(loaded_llama.fingerprint, corpus.fingerprint, 1, 40, "float32")
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    assert metadata["layer"] == "1"
    assert metadata["tokens"] == "40"
    metadata[field] = "something else"
    # A stale entry at the right path: the tensor is changed so a reuse would show.
    save_file({"total": first[1].total * 2}, str(path), metadata=metadata)

    counting = _CountingCollect()
    monkeypatch.setattr(stats, "collect_second_moments", counting)
    again = layer_second_moments(loaded_llama, [1], corpus, max_tokens=40, progress=False)
    assert counting.calls == [[1]]
    assert torch.equal(again[1].total, first[1].total)
    # The rewritten entry is valid again.
    monkeypatch.setattr(stats, "collect_second_moments", _fail)
    layer_second_moments(loaded_llama, [1], corpus, max_tokens=40, progress=False)


def test_layer_second_moments_recomputes_for_other_corpus_or_tokens(loaded_llama, monkeypatch):
    layer_second_moments(loaded_llama, [1], _corpus(TEXTS), max_tokens=40, progress=False)
    counting = _CountingCollect()
    monkeypatch.setattr(stats, "collect_second_moments", counting)
    other = _corpus(TEXTS[3:], tag="other")
    layer_second_moments(loaded_llama, [1], other, max_tokens=40, progress=False)
    layer_second_moments(loaded_llama, [1], _corpus(TEXTS), max_tokens=30, progress=False)
    assert counting.calls == [[1], [1]]


def test_layer_second_moments_recomputes_an_unreadable_cache(loaded_llama, monkeypatch):
    corpus = _corpus(TEXTS)
    first = layer_second_moments(loaded_llama, [2], corpus, max_tokens=40, progress=False)
    path = stats_cache_path(loaded_llama.fingerprint, corpus.fingerprint, 2, 40, "float32")
    path.write_bytes(b"not a safetensors file")
    counting = _CountingCollect()
    monkeypatch.setattr(stats, "collect_second_moments", counting)
    again = layer_second_moments(loaded_llama, [2], corpus, max_tokens=40, progress=False)
    assert counting.calls == [[2]]
    assert torch.equal(again[2].total, first[2].total)


# -- corpora -----------------------------------------------------------------------------------


def test_load_corpus_txt_and_jsonl(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("First block\nstill first.\n\n\nSecond block.\n\n  \n", encoding="utf-8")
    corpus = load_corpus(str(txt))
    assert corpus.texts == ["First block\nstill first.", "Second block."]
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text(
        json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 3}) + "\n",
        encoding="utf-8",
    )
    corpus = load_corpus(str(jsonl))
    assert corpus.texts == ["one", "two"]
    import hashlib

    assert corpus.fingerprint == hashlib.sha256(jsonl.read_bytes()).hexdigest()


def test_load_corpus_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match="line 2"):
        load_corpus(str(bad))
    bad.write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(CorpusError, match="line 2: not valid JSON"):
        load_corpus(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="no text"):
        load_corpus(str(empty))
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(str(tmp_path / "missing" / "corpus.txt"))
    with pytest.raises(CorpusError, match="no model"):
        load_corpus(None)


def test_load_corpus_sampled_from_the_model(tiny_tokenizer):
    model = make_tiny_model("llama", tiny_tokenizer)
    loaded = LoadedModel(model=model, tokenizer=tiny_tokenizer, name="tiny-llama")
    rng = torch.get_rng_state()
    corpus = load_corpus(None, loaded, sample_texts=3, sample_tokens=4)
    assert torch.equal(torch.get_rng_state(), rng)  # private generator
    assert len(corpus.texts) == 3
    assert corpus.texts[0].startswith("The")
    again = load_corpus(None, loaded, sample_texts=3, sample_tokens=4)
    assert again.texts == corpus.texts
    assert again.fingerprint == corpus.fingerprint
    other = load_corpus(None, loaded, sample_texts=3, sample_tokens=4, seed=1)
    assert other.fingerprint != corpus.fingerprint


@pytest.mark.parametrize(("width", "block"), [(7, 3), (12, 4), (5, 8), (9, 1)])
def test_add_gram_equals_the_full_product(width, block):
    keys = torch.randn(11, width, generator=torch.Generator().manual_seed(width))
    total = torch.randn(width, width, dtype=torch.float64)
    start = total.clone()
    add_gram(total, keys, block=block)
    naive = start + keys.double().T @ keys.double()
    torch.testing.assert_close(total, naive, rtol=1e-5, atol=1e-5)
    # Outside the diagonal blocks the lower part is the transpose of the upper one.
    added = torch.zeros(width, width, dtype=torch.float64)
    add_gram(added, keys, block=block)
    for row in range(width):
        for col in range(width):
            if row // block != col // block:
                assert added[row, col] == added[col, row]


# -- the statistics recipe: whole texts (the authors') or pieces -------------------------------

LONG_TEXT = " ".join(TRAINING_SENTENCES)  # longer than the tiny models' context


def test_whole_texts_equal_the_definition(tiny_model):
    """Every key of every token of every text, each text run alone and truncated to the
    model's context, summed in float64 and divided by the count."""
    model, tok = tiny_model
    texts = [*TEXTS[:6], LONG_TEXT]
    context = model.config.max_position_embeddings
    assert len(tok(LONG_TEXT)["input_ids"]) > context
    sequences = [tok(t)["input_ids"][:context] for t in texts]
    # Small passes: texts of several lengths padded together, the long one alone.
    got = collect_second_moments(
        model, tok, [1, 3], _corpus(texts), max_tokens=10**6, tokens_per_pass=60, progress=False
    )
    expected = _naive_moments(model, sequences, [1, 3])
    _assert_moments_equal(got, expected)
    assert got[1].count == sum(len(s) for s in sequences)


def test_whole_texts_cap_budget_and_samples(tiny_tokenizer):
    model = make_tiny_model("llama", tiny_tokenizer)
    tok = tiny_tokenizer
    ids = [tok(t)["input_ids"] for t in TEXTS[:5]]
    assert all(len(i) > 6 for i in ids)
    # A cap of 6 tokens per text, and a token budget ending inside the third text.
    got = collect_second_moments(
        model, tok, [2], _corpus(TEXTS), max_tokens=15, recipe=StatsRecipe(max_len=6),
        progress=False,
    )  # fmt: skip
    _assert_moments_equal(got, _naive_moments(model, [ids[0][:6], ids[1][:6], ids[2][:3]], [2]))
    # A sample count: the first 4 texts whole, whatever the token budget.
    got = collect_second_moments(
        model, tok, [2], _corpus(TEXTS), max_tokens=5, recipe=StatsRecipe(samples=4),
        progress=False,
    )  # fmt: skip
    _assert_moments_equal(got, _naive_moments(model, ids[:4], [2]))


def test_pieces_of_256_tokens_cut_a_long_text(tiny_tokenizer):
    model = make_tiny_model("llama", tiny_tokenizer)
    tok = tiny_tokenizer
    ids = tok(LONG_TEXT)["input_ids"]
    got = collect_second_moments(
        model, tok, [1], _corpus([LONG_TEXT]), max_tokens=10**6,
        recipe=StatsRecipe(piece_tokens=256), progress=False,
    )  # fmt: skip
    pieces = [ids[i : i + 256] for i in range(0, len(ids), 256)]
    _assert_moments_equal(got, _naive_moments(model, [p for p in pieces if len(p) >= 2], [1]))


def test_the_256_recipe_keeps_its_batches(monkeypatch, tiny_tokenizer):
    """The old recipe's passes (so its sums, bitwise) and the plan a partial records."""
    model = make_tiny_model("llama", tiny_tokenizer)
    seen: list[tuple[list[torch.Tensor], str]] = []
    real_shard = stats.stats_dist.shard

    def spying(batches, moments, checkpoint=None, plan=""):
        kept: list[torch.Tensor] = []
        seen.append((kept, plan))
        for batch in real_shard(batches, moments, checkpoint, plan):
            kept.append(batch[0])
            yield batch

    monkeypatch.setattr(stats.stats_dist, "shard", spying)
    corpus = _corpus([LONG_TEXT, *TEXTS])
    collect_second_moments(
        model, tiny_tokenizer, [1], corpus, max_tokens=700, recipe=StatsRecipe(piece_tokens=256),
        progress=False,
    )  # fmt: skip
    pieces = []
    budget = 700
    for text in corpus.texts:  # the cutting sphere-edit did before the recipes
        ids = tiny_tokenizer(text)["input_ids"]
        for begin in range(0, len(ids), 256):
            piece = ids[begin : begin + 256][:budget]
            if len(piece) >= 2:
                pieces.append(piece)
                budget -= len(piece)
        if budget <= 0:
            break
    pieces.sort(key=len)
    expected = list(stats.packed_batches(pieces, 4096, tiny_tokenizer.pad_token_id))
    batches, plan = seen[0]
    assert plan == f"256:4096:{len(pieces)}"
    assert [b.tolist() for b in batches] == [ids.tolist() for ids, _mask in expected]


def test_a_cache_of_another_recipe_is_not_read(loaded_llama, monkeypatch):
    corpus = _corpus(TEXTS)
    pieces = StatsRecipe.parse("256")
    old = layer_second_moments(loaded_llama, [1], corpus, max_tokens=40, recipe=pieces)
    old_path = stats_cache_path(
        loaded_llama.fingerprint, corpus.fingerprint, 1, 40, "float32", pieces
    )
    new_path = stats_cache_path(loaded_llama.fingerprint, corpus.fingerprint, 1, 40, "float32")
    assert old_path.exists() and old_path != new_path
    with safe_open(str(old_path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    assert metadata["pieces"] == "256" and "max_len" not in metadata
    # An entry written before recipes were recorded, at the default recipe's name.
    legacy = {k: v for k, v in metadata.items() if k != "pieces"}
    save_file({"total": old[1].total * 2}, str(new_path), metadata=legacy)
    counting = _CountingCollect()
    monkeypatch.setattr(stats, "collect_second_moments", counting)
    layer_second_moments(loaded_llama, [1], corpus, max_tokens=40, progress=False)
    assert counting.calls == [[1]]
    with safe_open(str(new_path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    assert metadata["pieces"] == "whole"
    assert metadata["max_len"] == str(loaded_llama.model.config.max_position_embeddings)
    # Counted in samples, it is another entry again.
    samples = StatsRecipe(samples=3)
    layer_second_moments(loaded_llama, [1], corpus, recipe=samples, progress=False)
    assert counting.calls == [[1], [1]]
    path = stats_cache_path(
        loaded_llama.fingerprint, corpus.fingerprint, 1, None, "float32", samples
    )
    assert path.name == "layer1-3samples-float32.safetensors"
    monkeypatch.setattr(stats, "collect_second_moments", _fail)
    layer_second_moments(loaded_llama, [1], corpus, max_tokens=40, recipe=pieces)
    layer_second_moments(loaded_llama, [1], corpus, recipe=samples)


def test_context_length_and_its_fallback(caplog):
    from types import SimpleNamespace

    from torch import nn

    gpt2_like = nn.Linear(1, 1)
    gpt2_like.config = SimpleNamespace(n_positions=1024)
    assert stats.context_length(gpt2_like) == 1024
    bare = nn.Linear(1, 1)
    bare.config = SimpleNamespace()
    with caplog.at_level("WARNING"):
        assert stats.context_length(bare) == stats.FALLBACK_MAX_LEN
    assert "no context length" in caplog.text


def test_recipe_errors_name_the_field():
    with pytest.raises(stats.StatsRecipeError, match="^stats_pieces: cannot read 'halves'"):
        StatsRecipe.parse("halves")
    with pytest.raises(stats.StatsRecipeError, match="^stats_pieces: pieces of 1 tokens"):
        StatsRecipe.parse("1")
    with pytest.raises(stats.StatsRecipeError, match="^stats_samples: must be at least 1"):
        StatsRecipe.parse("whole", 0)
    assert StatsRecipe.parse(" Whole ") == StatsRecipe()
    assert StatsRecipe.parse("256", 7) == StatsRecipe(piece_tokens=256, samples=7)


def test_the_journal_header_refuses_a_resume_with_another_recipe(loaded_llama, tmp_path):
    from sphere_edit.editing.build import build_session
    from sphere_edit.editing.journal import JournalError

    def header(**recipe):
        session = build_session(
            loaded_llama, "memit", layers=[1, 2], corpus=_corpus(TEXTS),
            run_dir=tmp_path / "run", progress=False, log=lambda _line: None,
            **{"stats_tokens": 50, **recipe},
        )  # fmt: skip
        return session, session.header()

    session, whole = header()
    assert (whole["stats_pieces"], whole["stats_samples"]) == ("whole", None)
    assert whole["template_tokens"] == "authors"
    _, pieces = header(stats_pieces="256", template_tokens=10)
    assert pieces["stats_pieces"] == "256" and pieces["template_tokens"] == 10
    with pytest.raises(JournalError, match="stats_pieces differs"):
        session.journal.verify(pieces, loaded_llama.fingerprint, whole)
    with pytest.raises(JournalError, match="stats_pieces differs"):
        session.journal.verify(whole, loaded_llama.fingerprint, pieces)
    # A journal written before the recipe was recorded: the 256-token pieces.
    before = {k: v for k, v in pieces.items() if k not in ("stats_pieces", "stats_samples")}
    before.pop("template_tokens")
    session.journal.verify(pieces, loaded_llama.fingerprint, before)
    with pytest.raises(JournalError, match="stats_pieces differs: the journal has '256'"):
        session.journal.verify(whole, loaded_llama.fingerprint, before)
    _, samples = header(stats_tokens=None, stats_samples=4)
    assert samples["stats_tokens"] is None
    with pytest.raises(JournalError, match="stats_(tokens|samples) differs"):
        session.journal.verify(samples, loaded_llama.fingerprint, whole)
    # The templates come from the journal: how they were sampled does not block a resume.
    _, other_templates = header(template_tokens=10)
    session.journal.verify(other_templates, loaded_llama.fingerprint, whole)
    with pytest.raises(stats.StatsRecipeError, match="^stats_samples: give either"):
        header(stats_samples=4, stats_tokens=50)
