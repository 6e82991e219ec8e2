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
