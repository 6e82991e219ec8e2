"""Target vectors v*: the optimisation lowers the target NLL, respects the clamp, and
optimising requests together gives what optimising each alone gives."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sphere_edit.editing.keys import key_precision, read_layer
from sphere_edit.editing.requests import EditRequest, RequestError
from sphere_edit.editing.text import target_token_ids
from sphere_edit.editing.vstar import (
    WARM_FACTOR,
    WARM_FLOOR,
    VStarConfig,
    VStarResult,
    compute_vstar,
    pass_groups,
    warm_factor,
)
from sphere_edit.model.arch import ModelLayout
from tests.tiny_models import make_tiny_model
from tests.unit._helpers import (
    decoder_layer,
    requests_abc,
    subject_end_in,
    subject_last_index_by_decoding,
)

TEMPLATES = ["{}", "The city of Paris. {}"]
FAMILIES = ["llama", "gpt2", "gemma3_text"]


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    return {family: make_tiny_model(family, tiny_tokenizer) for family in FAMILIES}


def _targets(model, tok, requests, config, z_layer=1, templates=TEMPLATES) -> VStarResult:
    return compute_vstar(model, tok, ModelLayout.of(model), z_layer, requests, templates, config)


@pytest.mark.parametrize("family", FAMILIES)
def test_optimisation_lowers_the_target_nll(models, tiny_tokenizer, family):
    model = models[family]
    request = [EditRequest.create("{} is located in", "Toronto", "France")]
    # Without the KL and decay terms the loss is the NLL, and history records it per step.
    config = VStarConfig(steps=8, lr=0.1, kl_factor=0.0, weight_decay=0.0, clamp_factor=10.0)
    result = _targets(model, tiny_tokenizer, request, config)
    assert len(result.history) == 8
    assert result.history[-1] < result.history[0] - 0.05
    assert float(result.nll[0]) == pytest.approx(result.history[-1], abs=1e-6)
    start = _targets(model, tiny_tokenizer, request, dataclasses.replace(config, steps=1))
    assert float(start.nll[0]) == pytest.approx(result.history[0], abs=1e-5)
    assert float(result.nll[0]) < float(start.nll[0]) - 0.05
    assert torch.equal(start.vectors, start.init)  # one step: no update yet
    assert int(result.steps[0]) == 8


@pytest.mark.parametrize("family", FAMILIES)
def test_clamp_bounds_the_change(models, tiny_tokenizer, family):
    model = models[family]
    clamp = 0.3
    config = VStarConfig(steps=5, lr=1.0, weight_decay=0.0, clamp_factor=clamp)
    result = _targets(model, tiny_tokenizer, requests_abc(), config)
    change = (result.vectors - result.init).norm(dim=1)
    limit = clamp * result.init.norm(dim=1)
    assert torch.all(change <= limit + 1e-5)
    # The clamp is active: with lr = 1 the unclamped steps would go much further.
    assert torch.all(change >= 0.99 * limit)


@pytest.mark.parametrize("family", FAMILIES)
def test_init_is_the_layer_output_at_the_subject(models, tiny_tokenizer, family):
    model = models[family]
    requests = requests_abc()
    result = _targets(model, tiny_tokenizer, requests, VStarConfig(steps=1), z_layer=2)
    readout = read_layer(model, tiny_tokenizer, ModelLayout.of(model), 0, 2, requests, TEMPLATES)
    torch.testing.assert_close(result.init, readout.z_out, atol=1e-5, rtol=1e-5)
    assert result.vectors.shape == (3, model.config.get_text_config().hidden_size)


@torch.no_grad()
def _independent_nll(model, tok, request, delta, z_layer) -> float:
    """Mean over templates of the mean token NLL of the target, with ``delta`` added to
    layer ``z_layer``'s output at the subject's last token, one unpadded prompt at a time."""
    target = target_token_ids(tok, request.text, request.target_new)
    values = []
    for context in TEMPLATES:
        text = context.replace("{}", request.text)
        prompt_ids = tok(text)["input_ids"]
        subject_end = subject_end_in(context, request)
        position = subject_last_index_by_decoding(tok, prompt_ids, subject_end)

        def add(_module, _args, output, position=position):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[0, position] += delta
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = decoder_layer(model, z_layer).register_forward_hook(add)
        try:
            logits = model(input_ids=torch.tensor([prompt_ids + target[:-1]])).logits[0]
        finally:
            handle.remove()
        log_probs = logits.log_softmax(-1)
        start = len(prompt_ids) - 1
        nll = [-float(log_probs[start + j, token]) for j, token in enumerate(target)]
        values.append(sum(nll) / len(nll))
    return sum(values) / len(values)


@pytest.mark.parametrize("family", FAMILIES)
def test_reported_nll_matches_an_independent_forward(models, tiny_tokenizer, family):
    model = models[family]
    requests = [
        EditRequest.create("{} plays the", "Glenn Gould", "guitar"),
        EditRequest.create("The mother tongue of {} is", "Marie Curie", "English or French"),
    ]
    result = _targets(model, tiny_tokenizer, requests, VStarConfig(steps=4, lr=0.2))
    for i, request in enumerate(requests):
        delta = result.vectors[i] - result.init[i]
        assert float(delta.norm()) > 0
        expected = _independent_nll(model, tiny_tokenizer, request, delta, z_layer=1)
        assert float(result.nll[i]) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_optimisation_equals_each_request_alone(models, tiny_tokenizer, family):
    model = models[family]
    requests = requests_abc()
    config = VStarConfig(steps=5, lr=0.1, requests_per_pass=3)
    together = _targets(model, tiny_tokenizer, requests, config)
    one_per_pass = _targets(
        model, tiny_tokenizer, requests, dataclasses.replace(config, requests_per_pass=1)
    )
    # Passes group requests by tail length (2, 3, 4 tokens here: requests 1 and 2, then
    # 0), not in input order; the results must still come back in input order.
    two_per_pass = _targets(
        model, tiny_tokenizer, requests, dataclasses.replace(config, requests_per_pass=2)
    )
    # A positions cap of 12 (two templates): tails 2 and 3 share a pass, 4 runs alone.
    capped = _targets(
        model, tiny_tokenizer, requests, dataclasses.replace(config, positions_per_pass=12)
    )
    alone = [_targets(model, tiny_tokenizer, [r], config) for r in requests]
    alone_targets = torch.cat([a.vectors for a in alone])
    assert float((together.vectors - together.init).norm()) > 0
    torch.testing.assert_close(together.vectors, alone_targets, atol=1e-4, rtol=0)
    torch.testing.assert_close(one_per_pass.vectors, alone_targets, atol=1e-4, rtol=0)
    torch.testing.assert_close(two_per_pass.vectors, alone_targets, atol=1e-4, rtol=0)
    torch.testing.assert_close(capped.vectors, alone_targets, atol=1e-4, rtol=0)
    torch.testing.assert_close(together.nll, torch.cat([a.nll for a in alone]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_routes_agree(models, tiny_tokenizer, family):
    model = models[family]
    requests = [*requests_abc(), EditRequest.create("{} is a city in", "Lyon", "Italy")]
    templates = ["{}", "Toronto. {}", "The official language of France is French. {}"]
    config = VStarConfig(steps=4, lr=0.2)
    cached = _targets(model, tiny_tokenizer, requests, config, templates=templates)
    reference = _targets(
        model,
        tiny_tokenizer,
        requests,
        dataclasses.replace(config, route="reference"),
        templates=templates,
    )
    torch.testing.assert_close(cached.init, reference.init, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached.vectors, reference.vectors, atol=1e-4, rtol=0)
    torch.testing.assert_close(cached.nll, reference.nll, atol=1e-4, rtol=0)


def test_target_that_tokenises_to_nothing_names_the_request(models, tiny_tokenizer):
    requests = [
        EditRequest.create("{} is located in", "Toronto", "France"),
        EditRequest.create("{} plays the", "Glenn Gould", tiny_tokenizer.eos_token),
    ]
    with pytest.raises(RequestError, match="tokenises to nothing") as info:
        _targets(models["llama"], tiny_tokenizer, requests, VStarConfig(steps=1))
    assert info.value.index == 1
    assert info.value.field == "target_new"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"clamp_factor": -1.0}, "clamp_factor"),
        ({"requests_per_pass": 0}, "requests_per_pass"),
        ({"positions_per_pass": 0}, "positions_per_pass"),
    ],
)
def test_target_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VStarConfig(**kwargs)


def test_pass_groups_respect_both_caps():
    tails = [5, 2, 9, 2, 3, 30]
    by_count = pass_groups(tails, 2, VStarConfig(requests_per_pass=2))
    assert by_count == [[1, 3], [4, 0], [2, 5]]
    # 2 rows per request, at most 12 positions: (2 + 2) · 2 · ... grows with the tail.
    capped = pass_groups(tails, 2, VStarConfig(requests_per_pass=16, positions_per_pass=12))
    assert capped == [[1, 3], [4], [0], [2], [5]]  # 30 is over the cap: a pass of its own
    for group in capped:
        if len(group) > 1:
            assert len(group) * 2 * max(tails[r] for r in group) <= 12
    assert sorted(r for g in capped for r in g) == list(range(len(tails)))


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_pass_frees_the_prefix_of_skipped_layers(models, tiny_tokenizer, family):
    from sphere_edit.editing.vstar import _build_rows, _CachedPass

    model = models[family]
    layout = ModelLayout.of(model)
    z_layer = 1
    layers = [layout.layer(i) for i in range(z_layer + 1)]
    rows = _build_rows(tiny_tokenizer, requests_abc(), [0, 1], TEMPLATES[1:])
    with torch.no_grad():
        cached = _CachedPass(model, layers, layout.unembed(), rows, 0, torch.device("cpu"), False)
    per_layer = cached.cache.layers
    assert len(per_layer) > z_layer + 1, "the tiny model needs a layer above the edited one"
    # The mask construction reads lengths from the cache: a freed layer keeps the length
    # of a kept layer of its kind (Gemma's sliding-window layers hold fewer positions).
    kept = {type(x): x.keys.shape for x in per_layer[z_layer + 1 :]}
    for i, layer in enumerate(per_layer):
        storage = layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
        if i <= z_layer:  # skipped by every step: shape only
            assert storage <= 2 * layer.keys.element_size()
            if type(layer) in kept:
                assert layer.keys.shape == kept[type(layer)]
        else:
            assert storage >= layer.keys.numel() * layer.keys.element_size()


def test_default_optimizer_is_memits_adam():
    config = VStarConfig()
    assert (config.optimizer, config.lr, config.steps) == ("adam", 0.5, 25)


def test_unknown_optimizer_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="target optimizer must be one of adam, adam-warm"):
        VStarConfig(optimizer="sgd")  # type: ignore[arg-type]


def test_warm_factor_falls_linearly_from_warm_to_floor():
    steps = 25
    factors = [warm_factor(step, steps) for step in range(steps - 1)]
    assert factors[0] == pytest.approx(WARM_FACTOR)
    assert factors[-1] == pytest.approx(WARM_FLOOR)
    gaps = [b - a for a, b in zip(factors, factors[1:], strict=False)]
    assert gaps == pytest.approx([(WARM_FLOOR - WARM_FACTOR) / (steps - 2)] * (steps - 2))


def test_adam_warm_first_update_is_adam_at_the_warm_rate(models, tiny_tokenizer):
    model = models["llama"]
    base = VStarConfig(steps=2, lr=0.1, clamp_factor=100.0, loss_tolerance=0.0)
    warm = _targets(
        model, tiny_tokenizer, requests_abc(), dataclasses.replace(base, optimizer="adam-warm")
    )
    fast = dataclasses.replace(base, lr=base.lr * WARM_FACTOR)
    assert torch.equal(warm.vectors, _targets(model, tiny_tokenizer, requests_abc(), fast).vectors)
    plain = _targets(model, tiny_tokenizer, requests_abc(), base)
    assert not torch.equal(warm.vectors, plain.vectors)


def test_adam_adapt_halves_the_step_of_a_request_whose_loss_rose(models, tiny_tokenizer):
    model = models["llama"]
    config = VStarConfig(steps=3, lr=0.1, clamp_factor=100.0, loss_tolerance=0.0)
    requests = requests_abc()
    plain = _targets(model, tiny_tokenizer, requests, config)
    adapt = _targets(
        model, tiny_tokenizer, requests, dataclasses.replace(config, optimizer="adam-adapt")
    )
    # The first update has nothing to compare with: full Adam steps, as plain Adam.
    two = dataclasses.replace(config, steps=2)
    assert torch.equal(
        _targets(
            model, tiny_tokenizer, requests, dataclasses.replace(two, optimizer="adam-adapt")
        ).vectors,
        _targets(model, tiny_tokenizer, requests, two).vectors,
    )
    # The second update: Adam's step from the same point, scaled by 1/2 for a request
    # whose loss rose at step 2 and by 1 otherwise.
    rose = adapt.trace[1] > adapt.trace[0]
    after_one = _targets(model, tiny_tokenizer, requests, two)
    adam_step = plain.vectors - after_one.vectors
    scale = torch.where(rose, 0.5, 1.0).unsqueeze(1)
    assert torch.allclose(adapt.vectors, after_one.vectors + scale * adam_step, atol=1e-6)


def test_trace_records_every_requests_loss_per_step(models, tiny_tokenizer):
    config = VStarConfig(steps=4, lr=0.1)
    result = _targets(models["gpt2"], tiny_tokenizer, requests_abc(), config)
    assert len(result.trace) == len(result.history) == 4
    assert all(t.shape == (3,) for t in result.trace)
    assert [float(t.mean()) for t in result.trace] == pytest.approx(result.history)
    assert torch.equal(result.trace[-1], result.loss.cpu())


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_key_passes_are_close_to_fp32_and_follow_key_precision(models, tiny_tokenizer, family):
    model = models[family]
    layout = ModelLayout.of(model)
    args = (model, tiny_tokenizer, layout, 1, 1, requests_abc(), TEMPLATES)
    fp32 = read_layer(*args)
    bf16 = read_layer(*args, bf16=True)
    assert bf16.keys.dtype == torch.float32
    assert not torch.equal(bf16.keys, fp32.keys)  # the passes did run in bf16
    for ours, exact in [(bf16.keys, fp32.keys), (bf16.z_out, fp32.z_out)]:
        assert float((ours - exact).norm() / exact.norm()) < 3e-2
    with key_precision(True):
        assert torch.equal(read_layer(*args).keys, bf16.keys)
        assert torch.equal(read_layer(*args, bf16=False).keys, fp32.keys)
    assert torch.equal(read_layer(*args).keys, fp32.keys)  # the block's setting is gone


@pytest.mark.parametrize("family", FAMILIES)
def test_shallow_cache_copy_gives_bitwise_what_a_deep_copy_gives(
    models, tiny_tokenizer, family, monkeypatch
):
    from sphere_edit.editing import vstar_passes

    model = models[family]
    requests = [*requests_abc(), EditRequest.create("{} is a city in", "Lyon", "Italy")]
    templates = ["{}", "Toronto. {}", "The official language of France is French. {}"]
    config = VStarConfig(steps=4, lr=0.2, loss_tolerance=0.0)
    shallow = _targets(model, tiny_tokenizer, requests, config, templates=templates)
    seen = []
    real = vstar_passes._fresh_copy

    def deep(cache):
        seen.append(real(cache) is not cache)
        return __import__("copy").deepcopy(cache)

    monkeypatch.setattr(vstar_passes, "_fresh_copy", deep)
    deep_result = _targets(model, tiny_tokenizer, requests, config, templates=templates)
    assert seen and all(seen)
    assert torch.equal(shallow.vectors, deep_result.vectors)
    assert torch.equal(shallow.loss, deep_result.loss)


def test_a_forward_on_the_fresh_copy_leaves_the_prefix_cache_as_it_was(models, tiny_tokenizer):
    from sphere_edit.editing.vstar import _build_rows, _CachedPass

    model = models["gemma3_text"]  # sliding-window layers too
    layout = ModelLayout.of(model)
    layers = [layout.layer(i) for i in range(2)]
    rows = _build_rows(tiny_tokenizer, requests_abc(), [0, 1], TEMPLATES[1:])
    cached = _CachedPass(model, layers, layout.unembed(), rows, 0, torch.device("cpu"), False)
    before = [(x.keys, x.keys.clone(), x.values.clone()) for x in cached.cache.layers]
    delta = torch.zeros(len(rows.ids), model.config.hidden_size)
    with torch.no_grad():
        cached.run(delta, lambda _values: None)
        cached.run(delta, lambda _values: None)
    for layer, (tensor, keys, values) in zip(cached.cache.layers, before, strict=True):
        assert layer.keys is tensor  # the prefix cache's own tensors, not the appended ones
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_a_resume_with_another_precision_is_refused_naming_the_target(tmp_path, tiny_tokenizer):
    from sphere_edit.editing.journal import JournalError
    from sphere_edit.editing.session import EditSession
    from sphere_edit.methods import MEMIT
    from tests.unit._helpers import THREE_BATCHES, tiny_loaded

    loaded = tiny_loaded(tiny_tokenizer)
    layers = [1]
    moments = {1: torch.eye(loaded.layout.key_dim(1), dtype=torch.float64)}

    def session(bf16: bool) -> EditSession:
        return EditSession(
            loaded, MEMIT(mom2_weight=1.0), layers, moments, run_dir=tmp_path / "run",
            target=VStarConfig(steps=2, bf16=bf16), templates=["{}"],
        )  # fmt: skip

    first = session(bf16=False)
    first.apply(THREE_BATCHES[0])
    assert first.header()["target"]["bf16"] is False
    assert first.header()["target"]["optimizer"] == "adam"
    other = session(bf16=True)
    with pytest.raises(JournalError, match=r"target differs.*'bf16': False"):
        other.resume()


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_steps_with_weights_cast_once_equal_autocasts_own_casting(
    models, tiny_tokenizer, family, monkeypatch
):
    import contextlib

    import sphere_edit.editing.vstar as vstar

    config = VStarConfig(steps=3, lr=0.1, loss_tolerance=0.0, bf16=True)
    cast_once = _targets(models[family], tiny_tokenizer, requests_abc(), config)
    monkeypatch.setattr(vstar, "linear_weights_as", lambda *_: contextlib.nullcontext())
    recast = _targets(models[family], tiny_tokenizer, requests_abc(), config)
    assert torch.equal(cast_once.vectors, recast.vectors)
    assert torch.equal(cast_once.loss, recast.loss)
    assert all(p.dtype == torch.float32 for p in models[family].parameters())


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_eager_attention_option_is_close_to_sdpa_and_puts_sdpa_back(tiny_tokenizer, family):
    model = make_tiny_model(family, tiny_tokenizer, seed=0)
    model.set_attn_implementation("sdpa")
    config = VStarConfig(steps=3, lr=0.1, loss_tolerance=0.0)
    sdpa = _targets(model, tiny_tokenizer, requests_abc(), config)
    eager = _targets(
        model, tiny_tokenizer, requests_abc(), dataclasses.replace(config, attention="eager")
    )
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(eager.vectors, sdpa.vectors, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eager.loss, sdpa.loss, rtol=1e-4, atol=1e-5)


def test_auto_attention_is_eager_under_bf16_and_the_model_s_own_in_float32(tiny_tokenizer):
    model = make_tiny_model("llama", tiny_tokenizer, seed=0)
    model.set_attn_implementation("sdpa")
    for bf16, chosen in ((True, "eager"), (False, "model")):
        config = VStarConfig(steps=3, lr=0.1, loss_tolerance=0.0, bf16=bf16)
        auto = _targets(model, tiny_tokenizer, requests_abc(), config)
        named = _targets(
            model, tiny_tokenizer, requests_abc(), dataclasses.replace(config, attention=chosen)
        )
        assert torch.equal(auto.vectors, named.vectors), chosen
        assert config.eager_attention(torch.device("cpu")) == bf16
        assert not config.eager_attention(torch.device("cuda"))


def test_unknown_attention_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="target attention must be one of auto, model, eager"):
        VStarConfig(attention="flash")
