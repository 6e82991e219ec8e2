"""UltraEdit: its normaliser and solve against their definitions, the captured keys and
gradients against a direct computation, its effect on a tiny model, SPHERE on each edited
module, and the journal (resume, rollback, rebuilding the run's model)."""

from __future__ import annotations

import pytest
import torch

from sphere_edit.editing.journal import Journal
from sphere_edit.editing.requests import EditRequest
from sphere_edit.editing.runs import load_run_model
from sphere_edit.editing.session import EditSession
from sphere_edit.editing.text import encode, target_token_ids
from sphere_edit.methods import UltraEdit, make_method
from sphere_edit.methods.ultraedit import VARIANCE_FLOOR, Normaliser
from sphere_edit.model.arch import ModelLayout
from sphere_edit.sphere.projection import SphereProjection, principal_directions
from tests.unit._helpers import (
    THREE_BATCHES,
    assert_weights_equal,
    decoder_layer,
    module_at,
    requests_abc,
    tiny_loaded,
    weights_copy,
)

# Where each family keeps the MLP's input projections, written out independently of
# sphere_edit.model.arch: (gate, up) relative to a decoder layer.
INPUT_PROJECTIONS = {
    "gpt2": (None, "mlp.c_fc"),
    "gptj": (None, "mlp.fc_in"),
    "llama": ("mlp.gate_proj", "mlp.up_proj"),
    "mistral": ("mlp.gate_proj", "mlp.up_proj"),
    "qwen2": ("mlp.gate_proj", "mlp.up_proj"),
    "gemma3_text": ("mlp.gate_proj", "mlp.up_proj"),
}
LR = 0.1  # moves a tiny random model visibly; at 0.3 and above the multi-token target overshoots
TEMPLATES = ["{}"]


def _session(loaded, run_dir=None, transform=None) -> EditSession:
    method = make_method("ultraedit", lr=LR)
    layers = method.default_layers(loaded.layout.num_layers)  # type: ignore[union-attr]
    return EditSession(
        loaded, method, layers, {}, transform=transform, templates=TEMPLATES, run_dir=run_dir
    )


def _normaliser_tensors(session: EditSession) -> dict[str, torch.Tensor]:
    return {
        f"{site}.{name}": tensor
        for site, state in session.module_states.items()
        for name, tensor in state.cache["method_state"].items()
    }


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# -- the normaliser and the solve --------------------------------------------------------


def test_normaliser_running_statistics_equal_the_statistics_of_everything_seen():
    generator = torch.Generator().manual_seed(0)
    normaliser = Normaliser.empty(5)
    seen = []
    for n, scale, shift in [(3, 1.0, 0.0), (1, 10.0, -4.0), (7, 0.1, 100.0), (2, 3.0, 2.0)]:
        rows = torch.randn(n, 5, generator=generator, dtype=torch.float64) * scale + shift
        seen.append(rows)
        normaliser = normaliser.updated(rows)
        everything = torch.cat(seen)
        assert normaliser.count.item() == everything.shape[0]
        torch.testing.assert_close(normaliser.mean, everything.mean(0), rtol=0, atol=1e-12)
        variance = everything.var(0, unbiased=False)
        torch.testing.assert_close(normaliser.variance, variance, rtol=0, atol=1e-12)


@pytest.mark.parametrize("standardised_solve", [False, True])
def test_update_solves_its_normal_equations(standardised_solve):
    """The authors' code solves over the raw keys; the first reading over the standardised
    keys, then rescales by σ_g. Both from the definition, with the normaliser's statistics
    of both batches."""
    generator = torch.Generator().manual_seed(1)
    method = UltraEdit(lr=0.3, ridge=2.0, standardised_solve=standardised_solve)
    d_in, d_out = 6, 4
    first_keys = torch.randn(5, d_in, generator=generator, dtype=torch.float64)
    first_grads = torch.randn(5, d_out, generator=generator, dtype=torch.float64)
    _, state = method.update(first_keys, first_grads, None)
    keys = torch.randn(9, d_in, generator=generator, dtype=torch.float64) + 1.5
    grads = torch.randn(9, d_out, generator=generator, dtype=torch.float64) * 0.01
    delta, after = method.update(keys, grads, state)
    assert delta.shape == (d_out, d_in)

    # Standardise with the statistics of both batches, written from the definition.
    features = torch.cat([torch.cat([first_keys, first_grads], 1), torch.cat([keys, grads], 1)])
    mean = features.mean(0)
    std = torch.sqrt(features.var(0, unbiased=False) + VARIANCE_FLOOR)
    standard = (torch.cat([keys, grads], 1) - mean) / std
    k_hat, g_hat = standard[:, :d_in], standard[:, d_in:]
    values = -0.3 * (k_hat**2).sum(1, keepdim=True) * g_hat
    eye = torch.eye(d_in, dtype=torch.float64)
    if standardised_solve:  # ΔW = diag(σ_g) ΔŴ, and ΔŴ solves (K̂ᵀK̂ + λI) ΔŴᵀ = K̂ᵀV̂
        standardised_delta = delta / std[d_in:].unsqueeze(1)
        lhs = (k_hat.T @ k_hat + 2.0 * eye) @ standardised_delta.T
        torch.testing.assert_close(lhs, k_hat.T @ values, rtol=1e-10, atol=1e-12)
    else:  # (KᵀK + λI) ΔWᵀ = KᵀV̂ over the raw keys
        lhs = (keys.T @ keys + 2.0 * eye) @ delta.T
        torch.testing.assert_close(lhs, keys.T @ values, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(after["mean"], mean, rtol=0, atol=1e-12)


# -- the architecture table and the captured features -------------------------------------


@pytest.mark.parametrize("family", sorted(INPUT_PROJECTIONS))
def test_input_projections_of_every_family(tiny_tokenizer, family):
    loaded = tiny_loaded(tiny_tokenizer, family)
    layout = ModelLayout.of(loaded.model)
    gate, up = INPUT_PROJECTIONS[family]
    layer = decoder_layer(loaded.model, 1)
    assert layout.module(1, "up") is module_at(layer, up)
    if gate is None:
        with pytest.raises(ValueError, match="modules: .* no 'gate' module"):
            layout.module(1, "gate")
        assert UltraEdit().modules_for(layout) == ("up",)
    else:
        assert layout.module(1, "gate") is module_at(layer, gate)
        assert UltraEdit().modules_for(layout) == ("gate", "up")


def test_capture_reads_inputs_and_output_gradients_where_the_targets_are_predicted(
    tiny_tokenizer,
):
    loaded = tiny_loaded(tiny_tokenizer, "llama")
    model, layout = loaded.model, loaded.layout
    request = EditRequest.create("The mother tongue of {} is", "Marie Curie", "English French")
    sites = [(1, "gate"), (2, "up")]
    keys, grads, loss = UltraEdit().capture(model, tiny_tokenizer, layout, [request], sites)

    prompt = encode(tiny_tokenizer, request.text)
    target = target_token_ids(tiny_tokenizer, request.text, request.target_new)
    assert len(target) > 1
    # The output at position len(prompt) - 1 + j predicts target token j.
    positions = torch.arange(len(target)) + len(prompt) - 1
    seen: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(site):
        def record(_module, args, output):
            output.retain_grad()
            seen[site] = (args[0], output)

        return record

    handles = [
        module_at(decoder_layer(model, 1), "mlp.gate_proj").register_forward_hook(hook(sites[0])),
        module_at(decoder_layer(model, 2), "mlp.up_proj").register_forward_hook(hook(sites[1])),
    ]
    try:
        logits = model(input_ids=torch.tensor([prompt + target[:-1]])).logits[0]
        nll = -logits[positions].log_softmax(-1)[torch.arange(len(target)), target].mean()
        nll.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    assert loss == pytest.approx([float(nll.detach())], rel=1e-5)
    for layer, name in sites:
        inputs, output = seen[(layer, name)]
        torch.testing.assert_close(keys[layer], inputs[0, positions].double().detach())
        torch.testing.assert_close(grads[(layer, name)], output.grad[0, positions].double())


# -- in a session -------------------------------------------------------------------------


def _target_log_prob(loaded, requests: list[EditRequest]) -> torch.Tensor:
    """Mean log P(target_new token | prefix) of each request, one unpadded pass each."""
    out = []
    with torch.no_grad():
        for request in requests:
            prompt = encode(loaded.tokenizer, request.text)
            target = target_token_ids(loaded.tokenizer, request.text, request.target_new)
            logits = loaded.model(input_ids=torch.tensor([prompt + target])).logits[0]
            log_probs = logits[len(prompt) - 1 : -1].log_softmax(-1)
            out.append(log_probs[torch.arange(len(target)), target].mean())
    return torch.stack(out)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_batch_raises_the_probability_of_every_new_target(tiny_tokenizer, family):
    loaded = tiny_loaded(tiny_tokenizer, family)
    # One target of several tokens: the rows of keys and gradients are tokens, not requests.
    requests = [*requests_abc(), EditRequest.create("{} speaks", "Lionel Messi", "English French")]
    before = _target_log_prob(loaded, requests)
    session = _session(loaded)
    result = session.apply(requests)
    after = _target_log_prob(loaded, requests)
    assert bool((after > before).all()), (before, after)
    # Only the edited modules changed, by exactly the journaled deltas.
    edited = {state.weight_name for state in session.module_states.values()}
    assert set(session.batches[0].deltas) == edited
    assert set(result.energy_after) == set(session.layers)


def test_sphere_projects_each_module_update_off_that_modules_principal_directions(
    tiny_tokenizer,
):
    loaded = tiny_loaded(tiny_tokenizer, "llama")
    transform = SphereProjection(eta=0.5, alpha=1.0)
    session = _session(loaded, transform=transform)
    before = {site: state.pre_edit.double() for site, state in session.module_states.items()}
    session.apply(requests_abc())
    for site, state in session.module_states.items():
        delta = session.batches[0].deltas[state.weight_name].double()
        directions = principal_directions(before[site], 0.5)
        assert float(delta.norm()) > 0
        # With α = 1 nothing of ΔW is left along the module's own top neuron directions.
        assert float((delta @ directions).norm()) < 1e-5 * float(delta.norm())


def test_resume_continues_bitwise_as_an_uninterrupted_run(tiny_tokenizer, tmp_path):
    whole = tiny_loaded(tiny_tokenizer, "llama")
    uninterrupted = _session(whole, tmp_path / "whole")
    for batch in THREE_BATCHES:
        uninterrupted.apply(batch)

    first = _session(tiny_loaded(tiny_tokenizer, "llama"), tmp_path / "split")
    for batch in THREE_BATCHES[:2]:
        first.apply(batch)
    resumed = _session(tiny_loaded(tiny_tokenizer, "llama"), tmp_path / "split")
    assert resumed.resume() == 2
    _assert_same_tensors(_normaliser_tensors(resumed), _normaliser_tensors(first))
    resumed.apply(THREE_BATCHES[2])
    assert_weights_equal(resumed.loaded, weights_copy(whole))
    _assert_same_tensors(_normaliser_tensors(resumed), _normaliser_tensors(uninterrupted))
    _assert_same_tensors(resumed.batches[2].deltas, uninterrupted.batches[2].deltas)


def test_rollback_restores_weights_and_normalisers_bitwise(tiny_tokenizer, tmp_path):
    loaded = tiny_loaded(tiny_tokenizer, "llama")
    session = _session(loaded, tmp_path / "run")
    session.apply(THREE_BATCHES[0])
    weights, normalisers = weights_copy(loaded), _normaliser_tensors(session)
    session.apply(THREE_BATCHES[1])
    after_two = weights_copy(loaded)
    session.rollback(1)
    assert_weights_equal(loaded, weights)
    _assert_same_tensors(_normaliser_tensors(session), normalisers)
    session.apply(THREE_BATCHES[1])
    assert_weights_equal(loaded, after_two)
    assert len(Journal(tmp_path / "run").index()["batches"]) == 2


def test_the_runs_model_is_rebuilt_from_its_journal(tiny_tokenizer, tmp_path):
    loaded = tiny_loaded(tiny_tokenizer, "gpt2")
    session = _session(loaded, tmp_path / "run")
    for batch in THREE_BATCHES[:2]:
        session.apply(batch)
    fresh = tiny_loaded(tiny_tokenizer, "gpt2")
    untouched = weights_copy(fresh)
    rebuilt, index = load_run_model(tmp_path / "run", model=fresh)
    assert index["modules"] == ["up"]
    assert_weights_equal(rebuilt, weights_copy(loaded))
    # The snapshot a reader takes before replaying covers the journal's modules.
    from sphere_edit.editing.journal import index_modules, restore_weights, snapshot_weights

    other = tiny_loaded(tiny_tokenizer, "gpt2")
    stored = snapshot_weights(other.layout, index["layers"], index_modules(index))
    Journal(tmp_path / "run").replay(other, index)
    restore_weights(other.layout, stored)
    assert_weights_equal(other, untouched)
