"""Text sampled from the model: left-padded, cached generation equals a plain loop."""

from __future__ import annotations

import pytest
import torch

from sphere_edit.editing.sampling import generate_context_templates, sample_continuations

STARTS = ["The", "According to the", "Paris is the capital of"]


@torch.no_grad()
def _greedy_without_cache(model, tok, start: str, new_tokens: int) -> str:
    ids = tok(start)["input_ids"]
    generated = []
    for _ in range(new_tokens):
        logits = model(input_ids=torch.tensor([ids + generated])).logits[0, -1]
        generated.append(int(logits.argmax()))
    return start + tok.decode(generated, skip_special_tokens=True)


def test_cached_batched_sampling_equals_unbatched_greedy(tiny_model):
    """top_k = 1 is greedy: rows of different lengths, left-padded, with a key/value cache,
    must continue exactly as each start does alone without a cache."""
    model, tok = tiny_model
    got = sample_continuations(model, tok, STARTS, new_tokens=6, top_k=1, seed=0)
    assert got == [_greedy_without_cache(model, tok, s, 6) for s in STARTS]


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(tiny_tokenizer):
    from tests.tiny_models import make_tiny_model

    model = make_tiny_model("llama", tiny_tokenizer)
    state = torch.get_rng_state()
    a = sample_continuations(model, tiny_tokenizer, STARTS, new_tokens=5, top_k=50, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = sample_continuations(model, tiny_tokenizer, STARTS, new_tokens=5, top_k=50, seed=3)
    c = sample_continuations(model, tiny_tokenizer, STARTS, new_tokens=5, top_k=50, seed=4)
    assert a == b
    assert a != c


@pytest.mark.parametrize("seed", [0, 1])
def test_context_templates(tiny_tokenizer, seed):
    from tests.tiny_models import make_tiny_model

    model = make_tiny_model("gpt2", tiny_tokenizer)
    templates = generate_context_templates(model, tiny_tokenizer, seed=seed, new_tokens=4)
    assert templates[0] == "{}"
    assert len(templates) == 6
    for template in templates[1:]:
        assert template.count("{}") == 1
        assert template.endswith(". {}")
        assert "{" not in template[:-2] and "}" not in template[:-2]
    assert templates == generate_context_templates(model, tiny_tokenizer, seed=seed, new_tokens=4)


def _with_bos(tokenizer):
    """The tiny tokenizer, adding its beginning-of-sequence token as Llama's does."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    bos = tok.bos_token
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)]
    )
    return tok


def test_authors_template_length_counts_the_prompt(tiny_tokenizer):
    from sphere_edit.editing.sampling import CONTEXT_STARTS, template_new_tokens

    bos = _with_bos(tiny_tokenizer)
    for tok, extra in ((tiny_tokenizer, 0), (bos, 1)):
        for start in CONTEXT_STARTS:
            # max_out_len = 10 holds the prompt: BOS (when added) and the start's tokens.
            prompt = len(tiny_tokenizer.tokenize(start)) + extra
            assert len(tok(start)["input_ids"]) == prompt
            [count] = template_new_tokens(tok, [start], "authors")
            assert count == 10 - prompt
    assert template_new_tokens(bos, ["The", "I"], 10) == [10, 10]
    many = "Paris is the capital of France and the largest city of the country"
    assert template_new_tokens(bos, [many], "authors") == [0]


def test_per_start_counts_equal_separate_greedy_runs(tiny_model):
    model, tok = tiny_model
    got = sample_continuations(model, tok, STARTS, new_tokens=[2, 6, 0], top_k=1, seed=0)
    assert got == [
        _greedy_without_cache(model, tok, s, n) for s, n in zip(STARTS, [2, 6, 0], strict=True)
    ]


def test_template_tokens_choose_the_recipe(tiny_tokenizer):
    from tests.tiny_models import make_tiny_model

    model = make_tiny_model("llama", tiny_tokenizer)
    starts = ["The", "Because"]
    for tok in (tiny_tokenizer, _with_bos(tiny_tokenizer)):
        authors = generate_context_templates(model, tok, seed=2, starts=starts)
        counts = [10 - len(tok(start)["input_ids"]) for start in starts]
        samples = sample_continuations(model, tok, starts, new_tokens=counts, top_k=5, seed=2)
        assert authors == ["{}", *(" ".join(t.split()) + ". {}" for t in samples)]
        old = generate_context_templates(model, tok, seed=2, starts=starts, template_tokens=10)
        assert old == generate_context_templates(model, tok, seed=2, starts=starts, new_tokens=10)
        assert old != authors


@pytest.mark.parametrize("value", ["ten", 0, "-1", True])
def test_template_tokens_errors_name_the_field(value):
    from sphere_edit.editing.sampling import TemplateTokensError, parse_template_tokens

    with pytest.raises(TemplateTokensError, match="^template_tokens: "):
        parse_template_tokens(value)
    assert parse_template_tokens(" Authors ") == "authors"
    assert parse_template_tokens("10") == 10
