"""``skipped_layers``: the skipped layers compute nothing, the rest of the model gives what
it gives after the real layers, and the layers (accelerate's wrappers included) are left
as they were."""

from __future__ import annotations

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module

from sphere_edit.editing.vstar import VStarConfig, compute_vstar
from sphere_edit.model.arch import ModelLayout, get_module
from sphere_edit.model.hooks import capture, edit_output, skipped_layers
from tests.tiny_models import make_tiny_model
from tests.unit._helpers import requests_abc

FAMILIES = ["llama", "gpt2", "gemma3_text"]


def _wrapped(family: str, tokenizer) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """A tiny model whose decoder layers carry accelerate hooks, as a device map puts them."""
    model = make_tiny_model(family, tokenizer)
    container = get_module(model, ModelLayout.of(model).spec.layers)
    for layer in container:
        add_hook_to_module(layer, ModelHook())
    return model, container


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    return dict(
        tokenizer(
            ["The capital of France is", "Glenn Gould plays the"], return_tensors="pt", padding=True
        )
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("count", [1, 3, 4])
def test_skipping_gives_the_full_forward_and_leaves_wrappers(tiny_tokenizer, family, count):
    model, container = _wrapped(family, tiny_tokenizer)
    layers = list(container)
    wrappers = [layer.__dict__["forward"] for layer in container]
    batch = _batch(tiny_tokenizer)
    with torch.no_grad(), capture(container[count - 1]) as seen:
        full = model(**batch).logits
    called: list[int] = []
    for i, layer in enumerate(container):
        layer.register_forward_pre_hook(lambda *_args, i=i: called.append(i))
    with torch.no_grad(), skipped_layers(container, count, seen.raw_output, seen.output):
        skipped = model(**batch).logits
    assert torch.equal(skipped, full)
    assert called == list(range(count, len(container)))  # the skipped ones never ran
    for layer, wrapper in zip(container, wrappers, strict=True):
        assert layer.__dict__["forward"] is wrapper
        assert isinstance(layer._hf_hook, ModelHook)
    assert all(a is b for a, b in zip(container, layers, strict=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_given_hidden_replaces_the_last_skipped_output(tiny_tokenizer, family):
    model, container = _wrapped(family, tiny_tokenizer)
    batch = _batch(tiny_tokenizer)
    with torch.no_grad(), capture(container[1]) as seen:
        model(**batch)
    shifted = seen.output + 0.25
    with torch.no_grad(), edit_output(container[1], lambda h: h + 0.25):
        expected = model(**batch).logits
    with torch.no_grad(), skipped_layers(container, 2, seen.raw_output, shifted):
        got = model(**batch).logits
    assert torch.equal(got, expected)


def test_restores_the_layers_when_the_forward_fails(tiny_tokenizer):
    model, container = _wrapped("llama", tiny_tokenizer)
    layers = list(container)
    with torch.no_grad(), capture(container[0]) as seen:
        model(**_batch(tiny_tokenizer))
    with pytest.raises(RuntimeError), skipped_layers(container, 2, seen.raw_output, seen.output):
        raise RuntimeError("boom")
    assert all(a is b for a, b in zip(container, layers, strict=True))


def test_count_out_of_range_is_refused(tiny_tokenizer):
    model, container = _wrapped("llama", tiny_tokenizer)
    with pytest.raises(ValueError, match="count"), skipped_layers(container, 0, None, None):
        pass


@pytest.mark.parametrize("family", FAMILIES)
def test_vstar_on_accelerate_wrapped_layers_is_bitwise_the_plain_one(tiny_tokenizer, family):
    plain = make_tiny_model(family, tiny_tokenizer)
    model, container = _wrapped(family, tiny_tokenizer)
    wrappers = [layer.__dict__["forward"] for layer in container]
    config = VStarConfig(steps=3, lr=0.2)
    templates = ["{}", "The city of Paris. {}"]
    requests = requests_abc()
    want = compute_vstar(
        plain, tiny_tokenizer, ModelLayout.of(plain), 1, requests, templates, config
    )
    got = compute_vstar(
        model, tiny_tokenizer, ModelLayout.of(model), 1, requests, templates, config
    )
    assert torch.equal(got.vectors, want.vectors)
    assert torch.equal(got.loss, want.loss)
    assert all(layer.__dict__["forward"] is w for layer, w in zip(container, wrappers, strict=True))
