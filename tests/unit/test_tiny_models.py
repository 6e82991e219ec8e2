"""Sanity checks for the tiny offline test models and tokenizer."""

from __future__ import annotations

import torch

from tests.tiny_models import (
    TINY_HIDDEN,
    TINY_LAYERS,
    TINY_MODEL_TYPES,
    make_tiny_model,
)


def test_tokenizer_is_fast_and_round_trips(tiny_tokenizer):
    assert tiny_tokenizer.is_fast
    for text in [
        "Paris is the capital of France.",
        "Toronto is located in Canada",
        " Glenn Gould plays the piano",
        "Zebra-42 ünïcödé text!",
    ]:
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tiny_tokenizer.decode(ids) == text


def test_tokenizer_offsets_and_special_tokens(tiny_tokenizer):
    text = "Rome is located in Italy"
    enc = tiny_tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    assert len(enc["offset_mapping"]) == len(enc["input_ids"])
    assert enc["offset_mapping"][-1][1] == len(text)
    assert tiny_tokenizer.eos_token == "<|endoftext|>"
    eos = tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.bos_token_id == eos
    assert tiny_tokenizer.pad_token_id == eos
    assert tiny_tokenizer.unk_token_id == eos
    assert 300 <= len(tiny_tokenizer) <= 512


def test_tokenizer_is_deterministic(tiny_tokenizer):
    from tests.tiny_models import make_tiny_tokenizer

    again = make_tiny_tokenizer()
    assert again.get_vocab() == tiny_tokenizer.get_vocab()


def test_tiny_model_forward(tiny_model):
    model, tok = tiny_model
    assert model.config.model_type in TINY_MODEL_TYPES
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.vocab_size == len(tok)
    assert model.get_input_embeddings().weight.shape == (len(tok), TINY_HIDDEN)
    assert model.config.num_hidden_layers == TINY_LAYERS
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight

    batch = tok(
        ["The capital of France is", "Glenn Gould plays the"],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(out.logits).all()


def test_tiny_model_is_seeded_and_does_not_leak_rng(tiny_tokenizer):
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    a = make_tiny_model("llama", tiny_tokenizer, seed=7)
    after = torch.rand(3)
    assert torch.equal(expected, after)

    b = make_tiny_model("llama", tiny_tokenizer, seed=7)
    c = make_tiny_model("llama", tiny_tokenizer, seed=8)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], pc[k]) for k in pa)


def test_every_family_has_expected_model_type(tiny_tokenizer):
    for model_type in TINY_MODEL_TYPES:
        model = make_tiny_model(model_type, tiny_tokenizer)
        assert model.config.model_type == model_type
