"""The baselines FT, ROME, RECT and PRUNE: each checked against its defining property,
inside a session with the SPHERE plug-in, and through the journal."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sphere_edit.cli.app import app
from sphere_edit.editing.build import MethodSpec
from sphere_edit.editing.keys import read_layer
from sphere_edit.editing.presets import generic_preset, load_preset
from sphere_edit.editing.requests import EditRequest
from sphere_edit.editing.session import EditSession
from sphere_edit.editing.stats import collect_second_moments, load_corpus
from sphere_edit.editing.vstar import VStarConfig, compute_vstar
from sphere_edit.methods import FT, MEMIT, PRUNE, RECT, ROME, AlphaEdit, LayerState, make_method
from sphere_edit.methods.base import EditContext
from sphere_edit.methods.prune import restrain_singular_values
from sphere_edit.methods.rect import relative_change
from sphere_edit.model.arch import ModelLayout
from sphere_edit.model.loading import LoadedModel
from sphere_edit.sphere.projection import SphereProjection, principal_directions
from tests.tiny_models import TRAINING_SENTENCES, make_tiny_model
from tests.unit._helpers import (
    assert_weights_equal,
    mlp_out_module,
    requests_abc,
    tiny_loaded,
    weights_copy,
)

TEMPLATES = ["{}", "The sun is a star. {}"]
TARGET = VStarConfig(steps=3)
D_K, D_OUT = 12, 7


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_spd(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, 3 * d, generator=_generator(seed), dtype=torch.float64)
    return a @ a.T / (3 * d) + 1e-3 * torch.eye(d, dtype=torch.float64)


def _state(weight: torch.Tensor, second_moment: torch.Tensor) -> LayerState:
    d = second_moment.shape[0]
    return LayerState(
        layer=0,
        weight_name="w",
        pre_edit=weight,
        second_moment=second_moment,
        edited_keys=torch.zeros(d, d, dtype=torch.float64),
    )


_MOMENTS: dict[tuple[str, tuple[int, ...]], dict[int, torch.Tensor]] = {}


def _moments(loaded: LoadedModel, layers: list[int], tmp_path: Path) -> dict[int, torch.Tensor]:
    key = (loaded.name, tuple(layers))
    if key not in _MOMENTS:
        corpus_file = tmp_path / "corpus.txt"
        corpus_file.write_text("\n\n".join(TRAINING_SENTENCES), encoding="utf-8")
        stats = collect_second_moments(
            loaded.model,
            loaded.tokenizer,
            layers,
            load_corpus(str(corpus_file)),
            max_tokens=2000,
            progress=False,
        )
        _MOMENTS[key] = {layer: m.moment for layer, m in stats.items()}
    return {layer: m.clone() for layer, m in _MOMENTS[key].items()}


# -- FT ---------------------------------------------------------------------------------------


def _ft_context(loaded: LoadedModel, layer: int) -> EditContext:
    weight = loaded.layout.read_weight(layer).detach().clone()
    d = weight.shape[1]
    state = _state(weight, torch.zeros(d, d, dtype=torch.float64))
    return EditContext(loaded.model, loaded.tokenizer, loaded.layout, ["{}"], state)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ft_clamp_holds_exactly_and_is_reached(tiny_tokenizer, family):
    loaded = tiny_loaded(tiny_tokenizer, family)
    before = weights_copy(loaded)
    epsilon = 1e-3
    method = FT(epsilon=epsilon, lr=1e-2, steps=4)
    result = method.compute(_ft_context(loaded, 1), requests_abc(), 1)
    assert_weights_equal(loaded, before)  # compute leaves the model as it found it
    delta = result.delta
    assert delta.dtype == torch.float64
    assert delta.shape == tuple(loaded.layout.read_weight(1).shape)  # (out, in)
    bound = float(torch.tensor(epsilon, dtype=torch.float32))  # ε as the weight holds it
    assert float(delta.abs().max()) <= bound
    assert int((delta.abs() == bound).sum()) > 0.1 * delta.numel()
    assert len(result.loss) == 3 and all(math.isfinite(x) for x in result.loss)


def test_ft_lowers_the_target_loss_and_unconstrained_goes_further(tiny_tokenizer):
    loaded = tiny_loaded(tiny_tokenizer, "llama")
    requests = requests_abc()
    start = FT(steps=1, lr=1e-12).compute(_ft_context(loaded, 1), requests, 1)
    clamped = FT(epsilon=1e-3, lr=1e-2, steps=6).compute(_ft_context(loaded, 1), requests, 1)
    free = FT(epsilon=None, lr=1e-2, steps=6).compute(_ft_context(loaded, 1), requests, 1)
    assert sum(clamped.loss) < sum(start.loss)
    assert sum(free.loss) < sum(clamped.loss)
    assert float(free.delta.abs().max()) > 1e-3


def test_ft_options_are_checked():
    for options in ({"epsilon": 0.0}, {"lr": -1.0}, {"steps": 0}):
        with pytest.raises(ValueError, match="ft"):
            FT(**options)


# -- ROME -------------------------------------------------------------------------------------


def test_rome_update_is_rank_one_and_maps_the_key_to_its_target():
    c0 = _random_spd(D_K, 0)
    weight = torch.randn(D_OUT, D_K, generator=_generator(1), dtype=torch.float64)
    key = torch.randn(1, D_K, generator=_generator(2), dtype=torch.float64)
    target = torch.randn(D_OUT, generator=_generator(3), dtype=torch.float64)
    residual = (target - weight @ key[0]).unsqueeze(0)
    delta = ROME().update(key, residual, _state(weight, c0))
    values = torch.linalg.svdvals(delta)
    assert float(values[1]) < 1e-12 * float(values[0])
    torch.testing.assert_close((weight + delta) @ key[0], target, atol=1e-10, rtol=0)
    # The row space is C0⁻¹ k*: a key x with k*ᵀ C0⁻¹ x = 0 is not moved.
    u = torch.linalg.solve(c0, key[0])
    x = torch.randn(D_K, generator=_generator(4), dtype=torch.float64)
    x = x - (u @ x) / (u @ u) * u
    assert float((delta @ x).norm()) < 1e-10


def test_rome_refuses_several_keys_at_once():
    c0 = _random_spd(D_K, 0)
    with pytest.raises(ValueError, match="one request at a time"):
        ROME().update(
            torch.ones(2, D_K, dtype=torch.float64),
            torch.ones(2, D_OUT, dtype=torch.float64),
            _state(torch.zeros(D_OUT, D_K, dtype=torch.float64), c0),
        )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rome_in_a_session_writes_v_star_at_k_star(tiny_tokenizer, tmp_path, family):
    """One request: the new weight maps k* to W k* + (z* − z), v* of ROME's objective."""
    loaded = tiny_loaded(tiny_tokenizer, family)
    layer = 2
    moments = _moments(loaded, [layer], tmp_path)
    request = requests_abc()[0]
    layout = loaded.layout
    model, tok = loaded.model, loaded.tokenizer
    targets = compute_vstar(model, tok, layout, layer, [request], TEMPLATES, TARGET)
    readout = read_layer(model, tok, layout, layer, layer, [request], TEMPLATES)
    before = layout.read_weight(layer).detach().double().clone()
    k_star = readout.keys[0].double()
    v_star = before @ k_star + (targets.vectors[0] - readout.z_out[0]).double()

    session = EditSession(
        loaded, ROME(), [layer], moments, target=TARGET, templates=TEMPLATES
    )  # fmt: skip
    session.apply([request])
    after = layout.read_weight(layer).detach().double()
    change = after - before
    values = torch.linalg.svdvals(change)
    assert float(values[1]) < 1e-5 * float(values[0])
    torch.testing.assert_close(after @ k_star, v_star, atol=1e-4, rtol=1e-4)


def test_rome_batch_is_applied_request_by_request(tiny_tokenizer, tmp_path):
    requests = requests_abc()[:2]
    one = tiny_loaded(tiny_tokenizer, "llama")
    moments = _moments(one, [2], tmp_path)
    batched = EditSession(one, ROME(), [2], moments, target=TARGET, templates=TEMPLATES)
    result = batched.apply(requests)
    assert len(batched.batches) == 1  # one journal entry
    assert batched.batches[0].keys[2].shape[0] == 2
    assert len(result.target_loss) == 2
    two = tiny_loaded(tiny_tokenizer, "llama")
    single = EditSession(two, ROME(), [2], moments, target=TARGET, templates=TEMPLATES)
    for request in requests:
        single.apply([request])
    got = mlp_out_module(one.model, 2).weight.detach()
    want = mlp_out_module(two.model, 2).weight.detach()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    base = mlp_out_module(tiny_loaded(tiny_tokenizer, "llama").model, 2).weight.detach()
    change = got.double() - base.double()
    values = torch.linalg.svdvals(change)
    assert float(values[2]) < 1e-4 * float(values[0])  # rank two: two rank-one updates


def test_single_layer_methods_refuse_several_layers_and_precomputed_targets(tiny_tokenizer):
    loaded = tiny_loaded(tiny_tokenizer, "llama")
    moments = {layer: torch.eye(128, dtype=torch.float64) for layer in (1, 2)}
    for method in (ROME(), FT()):
        with pytest.raises(ValueError, match="edits one layer"):
            EditSession(loaded, method, [1, 2], moments)
    session = EditSession(loaded, ROME(), [2], moments, target=TARGET, templates=TEMPLATES)
    targets = compute_vstar(
        loaded.model, tiny_tokenizer, loaded.layout, 2, requests_abc()[:1], TEMPLATES, TARGET
    )
    with pytest.raises(ValueError, match="precomputed_vstar"):
        session.apply(requests_abc()[:1], precomputed_vstar=targets)


# -- RECT -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.4, 0.1, 1.0])
def test_rect_keeps_the_stated_fraction_with_the_largest_relative_change(fraction):
    c0 = _random_spd(D_K, 5)
    weight = torch.randn(D_OUT, D_K, generator=_generator(6), dtype=torch.float64)
    keys = torch.randn(3, D_K, generator=_generator(7), dtype=torch.float64)
    residuals = torch.randn(3, D_OUT, generator=_generator(8), dtype=torch.float64)
    state = _state(torch.zeros_like(weight), c0)
    state.weight = weight  # what the session sets: the weight before this update
    full = MEMIT(mom2_weight=2.0).update(keys, residuals, state)
    rect = RECT(keep_fraction=fraction, mom2_weight=2.0)
    sparse = rect.finalize(rect.update(keys, residuals, state), state)
    kept = sparse != 0
    assert int(kept.sum()) == round(fraction * weight.numel())
    assert torch.equal(sparse[kept], full[kept])
    rel = (full / weight).abs()
    if not bool(kept.all()):
        assert float(rel[kept].min()) >= float(rel[~kept].max())


def test_rect_zero_weights_rank_first_when_changed_and_last_when_not():
    delta = torch.tensor([[1.0, 0.0, 3.0], [0.5, 2.0, 0.0]], dtype=torch.float64)
    weight = torch.tensor([[0.0, 0.0, 1.0], [1.0, 4.0, 2.0]], dtype=torch.float64)
    rel = relative_change(delta, weight)
    assert not bool(rel.isnan().any())
    assert rel[0, 0] == float("inf") and rel[0, 1] == 0.0
    torch.testing.assert_close(rel[1], torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    c0 = torch.eye(3, dtype=torch.float64)
    state = _state(torch.zeros_like(weight), c0)
    state.weight = weight
    keys = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    residuals = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    # MEMIT's update here is a constant 1/(λ+3) everywhere: the two zero weights it
    # would change get an infinite relative change and are kept before the rest.
    rect = RECT(keep_fraction=2 / 6, mom2_weight=1.0)
    sparse = rect.finalize(rect.update(keys, residuals, state), state)
    assert torch.equal(sparse != 0, weight == 0)


def test_rect_options_are_checked():
    for options in ({"keep_fraction": 0.0}, {"keep_fraction": 1.5}, {"mom2_weight": -1.0}):
        with pytest.raises(ValueError, match="rect"):
            RECT(**options)


# -- PRUNE ------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", [math.e, 10.0])
def test_prune_restrains_only_singular_values_above_sigma_max(base):
    w0 = torch.randn(D_OUT, D_K, generator=_generator(9), dtype=torch.float64)
    sigma_max = float(torch.linalg.svdvals(w0)[0])
    u, _ = torch.linalg.qr(torch.randn(D_OUT, D_OUT, generator=_generator(10), dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(D_K, D_OUT, generator=_generator(11), dtype=torch.float64))
    values = sigma_max * torch.tensor(
        [20.0, 4.0, 1.5, 0.9, 0.5, 0.1, 0.01], dtype=torch.float64
    )  # fmt: skip
    accumulated = u @ torch.diag(values) @ v.T
    method = PRUNE(log_base=base)
    restrained = method.restrain(accumulated, _state(w0, torch.eye(D_K, dtype=torch.float64)))
    got = torch.linalg.svdvals(restrained)
    log = math.log(base)
    expected = torch.where(
        values > sigma_max,
        torch.log(values) / log + sigma_max - math.log(sigma_max) / log,
        values,
    )
    torch.testing.assert_close(got, expected.sort(descending=True).values, atol=1e-10, rtol=0)
    below = values <= sigma_max
    torch.testing.assert_close(got[-int(below.sum()) :], values[below], atol=1e-10, rtol=0)
    # The singular vectors are kept: the same left and right subspaces, per value.
    torch.testing.assert_close(u.T @ restrained @ v, torch.diag(expected), atol=1e-10, rtol=0)


def test_prune_map_is_continuous_and_increasing():
    values = torch.linspace(0.1, 50.0, 500, dtype=torch.float64)
    mapped = restrain_singular_values(values, 2.0)
    assert bool((mapped.diff() > 0).all())
    torch.testing.assert_close(
        restrain_singular_values(torch.tensor([2.0], dtype=torch.float64), 2.0),
        torch.tensor([2.0], dtype=torch.float64),
    )
    with pytest.raises(ValueError, match="log_base"):
        PRUNE(log_base=1.0)


def test_prune_model_carries_w0_plus_the_restrained_sum(tiny_tokenizer, tmp_path):
    loaded = tiny_loaded(tiny_tokenizer, "llama")
    layers = [1, 2]
    moments = _moments(loaded, layers, tmp_path)
    w0 = {layer: loaded.layout.read_weight(layer).detach().double().clone() for layer in layers}
    method = PRUNE(mom2_weight=0.01, edit_restrained=True)
    sphere = SphereProjection(eta=0.5, alpha=0.8)
    session = EditSession(
        loaded, method, layers, moments, transform=sphere, target=TARGET, templates=TEMPLATES
    )
    for request in requests_abc():
        session.apply([request])
    restrained_any = False
    for layer in layers:
        state = session.states[layer]
        raw = sum(applied.raw[layer] for applied in session.batches)
        torch.testing.assert_close(state.accumulated, raw, atol=0, rtol=0)
        restrained = method.restrain(state.accumulated, state)
        u = principal_directions(w0[layer], 0.5)
        wanted = w0[layer] + restrained - 0.8 * restrained @ u @ u.T
        now = loaded.layout.read_weight(layer).detach().double()
        torch.testing.assert_close(now, wanted, atol=1e-6, rtol=0)
        sigma_max = float(torch.linalg.svdvals(w0[layer])[0])
        restrained_any |= float(torch.linalg.svdvals(raw)[0]) > sigma_max
    assert restrained_any  # the test edits are large enough for the restraint to act


# -- the SPHERE plug-in -----------------------------------------------------------------------


@dataclass(frozen=True)
class _CountingSphere(SphereProjection):
    calls: list = field(default_factory=list, compare=False, repr=False)

    def __call__(self, delta, *, current, pre_edit):
        self.calls.append(delta.shape)
        return super().__call__(delta, current=current, pre_edit=pre_edit)


ALL_METHODS = {
    "memit": lambda: MEMIT(mom2_weight=1.0),
    "alphaedit": lambda: AlphaEdit(),
    "ft": lambda: FT(lr=1e-2, steps=2),
    "rome": lambda: ROME(),
    "rect": lambda: RECT(mom2_weight=1.0),
    "prune": lambda: PRUNE(mom2_weight=1.0, edit_restrained=True),
}


def test_every_method_uses_the_one_sphere_object(tiny_tokenizer, tmp_path):
    loaded = tiny_loaded(tiny_tokenizer, "llama")
    moments = _moments(loaded, [1, 2], tmp_path)
    sphere = _CountingSphere(eta=0.5, alpha=0.8)
    seen = 0
    for name, make in ALL_METHODS.items():
        method = make()
        layers = [2] if name in ("ft", "rome") else [1, 2]
        session = EditSession(
            loaded, method, layers, moments, transform=sphere, target=TARGET, templates=TEMPLATES
        )
        assert session.transform is sphere, name
        session.apply(requests_abc()[:2])
        calls = len(sphere.calls) - seen
        # One projection per layer (ROME: per layer and request).
        assert calls == len(layers) * (2 if name == "rome" else 1), name
        seen = len(sphere.calls)
        session.rollback(1)


@pytest.mark.parametrize("name", ["ft", "rome", "rect", "prune", "memit", "alphaedit"])
def test_method_specs_and_preset_options(name):
    spec = MethodSpec.parse(f"{name}+sphere")
    assert spec.method == name and spec.sphere and str(spec) == f"{name}+sphere"
    assert MethodSpec.parse(name).sphere is False
    preset = load_preset("smollm2-135m")
    method = make_method(name, **preset.method_options(name))
    assert method.name == name
    assert preset.sphere_alpha(name) == (0.5 if name == "alphaedit" else 0.8)
    if name in ("ft", "rome"):
        assert preset.single_layer(name) == 9
    if name in ("rect", "prune"):
        assert method.mom2_weight == preset.methods["memit"]["mom2_weight"]
    assert generic_preset(30).single_layer(name) == generic_preset(30).layers[2]


# -- sessions and the journal -----------------------------------------------------------------

CASES = [
    ("ft", "gpt2", True),
    ("ft", "llama", False),
    ("rome", "gemma3_text", True),
    ("rome", "qwen2", False),
    ("rect", "gptj", True),
    ("rect", "llama", False),
    ("prune", "mistral", True),
    ("prune", "llama", False),
]
BATCHES = [
    requests_abc()[:2],
    [EditRequest.create("{} plays", "Lionel Messi", "hockey")],
    [EditRequest.create("{} is a city in", "Lyon", "Italy")],
]


@pytest.mark.parametrize(("name", "family", "sphere"), CASES)
def test_session_journal_round_trip(tiny_tokenizer, tmp_path, name, family, sphere):
    """Edit, then: replay the journal onto a fresh base, save it again, roll back; every
    route gives the weights bitwise, and a replayed session goes on editing exactly as
    the original does."""
    loaded = tiny_loaded(tiny_tokenizer, family)
    layers = [2] if name in ("ft", "rome") else [1, 2]
    moments = _moments(loaded, layers, tmp_path)
    transform = SphereProjection(eta=0.5, alpha=0.8) if sphere else None
    method = ALL_METHODS[name]()
    run_dir = tmp_path / "run"
    session = EditSession(
        loaded, method, layers, moments, transform=transform, target=TARGET,
        templates=TEMPLATES, run_dir=run_dir,
    )  # fmt: skip
    snapshots = [weights_copy(loaded)]
    for batch in BATCHES[:2]:
        session.apply(batch)
        snapshots.append(weights_copy(loaded))
    for layer in layers:
        name_w = loaded.layout.mlp_out_weight_name(layer)
        assert not torch.equal(snapshots[0][name_w], snapshots[2][name_w])
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    index = json.loads((copy / "session.json").read_text())
    assert index["method"]["method"] == name

    fresh = tiny_loaded(tiny_tokenizer, family)
    replayed = EditSession.load(copy, fresh, method, moments, transform=transform)
    assert_weights_equal(fresh, snapshots[2])
    for layer in layers:
        a, b = session.states[layer], replayed.states[layer]
        assert torch.equal(a.edited_keys, b.edited_keys)
        assert a.n_edits == b.n_edits == 3
        assert (a.accumulated is None) == (name != "prune")
        if a.accumulated is not None:
            assert torch.equal(a.accumulated, b.accumulated)

    replayed.save(tmp_path / "saved")
    again = tiny_loaded(tiny_tokenizer, family)
    EditSession.load(tmp_path / "saved", again, method, moments, transform=transform)
    assert_weights_equal(again, snapshots[2])

    # Both sessions edit on from the same state to the same weights.
    session.apply(BATCHES[2])
    replayed.apply(BATCHES[2])
    for layer in layers:
        w = loaded.layout.mlp_out_weight_name(layer)
        torch.testing.assert_close(
            loaded.model.state_dict()[w], fresh.model.state_dict()[w], atol=1e-7, rtol=0
        )

    session.rollback(2)
    assert_weights_equal(loaded, snapshots[1])
    if name == "prune":
        for layer in layers:
            torch.testing.assert_close(
                session.states[layer].accumulated,
                session.batches[0].raw[layer],
                atol=0,
                rtol=0,
            )
    session.rollback(1)
    assert_weights_equal(loaded, snapshots[0])
    assert json.loads((run_dir / "session.json").read_text())["batches"] == []


def test_ft_session_delta_respects_the_bound(tiny_tokenizer):
    loaded = tiny_loaded(tiny_tokenizer, "gpt2")
    layout = ModelLayout.of(loaded.model)
    moments = {2: torch.zeros(128, 128, dtype=torch.float64)}
    before = layout.read_weight(2).detach().clone()
    session = EditSession(
        loaded, FT(epsilon=1e-3, lr=1e-2, steps=3), [2], moments, templates=TEMPLATES
    )  # fmt: skip
    result = session.apply(requests_abc())
    stored = session.batches[0].deltas[layout.mlp_out_weight_name(2)]
    bound = torch.tensor(1e-3, dtype=torch.float32)
    assert bool((stored.abs() <= bound).all()) and bool((stored.abs() == bound).any())
    change = layout.read_weight(2).detach() - before
    assert float(change.abs().max()) <= float(bound) * (1 + 1e-4)
    assert len(result.target_loss) == 3


# -- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "extra"),
    [("rome+sphere", ["--layers", "2"]), ("ft", ["--option", "epsilon=null"])],
)
def test_cli_edit_with_a_baseline(tiny_tokenizer, tmp_path, monkeypatch, method, extra):
    monkeypatch.setenv("SPHERE_EDIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny-llama"
    make_tiny_model("llama", tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TRAINING_SENTENCES * 3), encoding="utf-8")
    requests = tmp_path / "requests.jsonl"
    requests.write_text(
        "\n".join(json.dumps(r.to_dict()) for r in requests_abc()[:2]) + "\n", encoding="utf-8"
    )
    out = tmp_path / "run"
    args = [
        "edit", "--model", str(folder), "--requests", str(requests), "--out", str(out),
        "--method", method, "--batch-size", "2", "--corpus", str(corpus),
        "--stats-tokens", "1000", "--steps", "2", *extra,
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    index = json.loads((out / "session.json").read_text())
    assert index["method_spec"] == method
    assert len(index["batches"]) == 1
    if method.startswith("ft"):
        assert index["method"]["epsilon"] is None
        assert index["corpus"] is None
        assert index["layers"] == [2]  # the middle of the generic window 1-2
    else:
        assert index["layers"] == [2]
        assert index["transform"]["alpha"] == 0.8
