"""EditSession.apply(precomputed_vstar=...): the same edit without re-running v*."""

from __future__ import annotations

import pytest
import torch

from sphere_edit.editing.session import EditSession
from sphere_edit.editing.vstar import VStarConfig, compute_vstar
from sphere_edit.methods import MEMIT
from sphere_edit.model.loading import LoadedModel
from tests.tiny_models import make_tiny_model
from tests.unit._helpers import mlp_out_module, requests_abc

LAYERS = [1, 2]
TEMPLATES = ["{}", "The sun is a star. {}"]
CONFIG = VStarConfig(steps=3)


def _session(tokenizer):
    model = make_tiny_model("llama", tokenizer, seed=0)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name="tiny-llama")
    d_k = mlp_out_module(model, LAYERS[0]).weight.shape[1]
    moments = {layer: torch.eye(d_k, dtype=torch.float64) for layer in LAYERS}
    return EditSession(loaded, MEMIT(mom2_weight=1.0), LAYERS, moments, target=CONFIG,
                       templates=TEMPLATES)  # fmt: skip


def test_precomputed_targets_give_the_same_edit(tiny_tokenizer):
    requests = requests_abc()
    plain = _session(tiny_tokenizer)
    plain.apply(requests)

    session = _session(tiny_tokenizer)
    loaded = session.loaded
    targets = compute_vstar(
        loaded.model, tiny_tokenizer, loaded.layout, LAYERS[-1], requests, TEMPLATES, CONFIG
    )
    result = session.apply(requests, precomputed_vstar=targets)
    for layer in LAYERS:
        got = mlp_out_module(session.loaded.model, layer).weight
        want = mlp_out_module(plain.loaded.model, layer).weight
        assert torch.equal(got, want)
    assert result.target_loss == pytest.approx([float(x) for x in targets.loss])


def test_precomputed_targets_of_the_wrong_shape_are_rejected(tiny_tokenizer):
    requests = requests_abc()
    session = _session(tiny_tokenizer)
    loaded = session.loaded
    targets = compute_vstar(
        loaded.model, tiny_tokenizer, loaded.layout, LAYERS[-1], requests[:2], TEMPLATES, CONFIG
    )
    before = mlp_out_module(loaded.model, LAYERS[0]).weight.clone()
    with pytest.raises(ValueError, match="precomputed_vstar"):
        session.apply(requests, precomputed_vstar=targets)
    assert torch.equal(mlp_out_module(loaded.model, LAYERS[0]).weight, before)
