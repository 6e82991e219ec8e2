"""Causal tracing on tiny random models: the restored runs against their definitions."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from sphere_edit.analysis.tracing import (
    POSITION_GROUPS,
    KnownFact,
    TraceConfig,
    TraceInputError,
    Tracer,
    fact_tokens,
    load_facts,
    position_groups,
    restored_layers,
    subject_noise,
    suggest_window,
    traced_probs,
)
from sphere_edit.cli.app import app
from sphere_edit.model.loading import LoadedModel
from tests.tiny_models import TINY_LAYERS, make_tiny_model
from tests.unit._helpers import decoder_layer, mlp_out_module

FACT = KnownFact("Toronto", "The city of Toronto is in the province of", "Ontario")
LONG_SUBJECT = KnownFact("Yo-Yo Ma", "The instrument of Yo-Yo Ma is the", "cello")


def _clean(model, tokens, modules):
    """P(true) of the plain run and the outputs of ``modules``, by hooks written here."""
    seen = {}
    handles = [
        m.register_forward_hook(
            lambda _m, _a, out, i=i: seen.__setitem__(
                i, (out[0] if isinstance(out, tuple) else out)[0]
            )
        )
        for i, m in enumerate(modules)
    ]
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokens.ids])).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    return float(logits.softmax(-1)[tokens.target]), [seen[i] for i in range(len(modules))]


def _noise(tokens, model, rows=4, seed=1):
    start, stop = tokens.subject
    dim = model.get_input_embeddings().weight.shape[1]
    return subject_noise(rows, stop - start, dim, 0.5, seed)


def test_restored_run_without_corruption_equals_the_clean_run(tiny_model):
    model, tokenizer = tiny_model
    tokens = fact_tokens(tokenizer, LONG_SUBJECT)
    mlps = [mlp_out_module(model, i) for i in range(TINY_LAYERS)]
    p_clean, states = _clean(model, tokens, mlps)
    length = len(tokens.ids)
    restore = [torch.zeros(3, length, dtype=torch.bool) for _ in mlps]
    restore[1][0, tokens.subject[1] - 1] = True
    restore[TINY_LAYERS - 1][1, length - 1] = True
    restore[0][2, :] = True
    probs = traced_probs(model, tokens, rows=3, modules=mlps, clean=states, restore=restore)
    torch.testing.assert_close(probs, torch.full((3,), p_clean), rtol=1e-5, atol=1e-7)


def test_corrupted_run_without_restoration_equals_the_corrupted_run(tiny_model):
    model, tokenizer = tiny_model
    tokens = fact_tokens(tokenizer, LONG_SUBJECT)
    noise = _noise(tokens, model)
    corrupted = traced_probs(model, tokens, rows=4, noise=noise)
    p_clean, _ = _clean(model, tokens, [])
    assert not torch.allclose(corrupted, torch.full((4,), p_clean))  # the noise matters
    # Restoring where nothing was corrupted (before the subject) is no restoration.
    mlps = [mlp_out_module(model, i) for i in range(TINY_LAYERS)]
    _, states = _clean(model, tokens, mlps)
    restore = [torch.zeros(4, len(tokens.ids), dtype=torch.bool) for _ in mlps]
    for where in restore:
        where[:, : tokens.subject[0]] = True
    again = traced_probs(model, tokens, rows=4, noise=noise, modules=mlps, clean=states,
                         restore=restore)  # fmt: skip
    torch.testing.assert_close(again, corrupted, rtol=1e-5, atol=1e-7)


def test_restoring_every_layer_at_every_position_gives_the_clean_probability(tiny_model):
    model, tokenizer = tiny_model
    tokens = fact_tokens(tokenizer, LONG_SUBJECT)
    layers = [decoder_layer(model, i) for i in range(TINY_LAYERS)]
    p_clean, states = _clean(model, tokens, layers)
    restore = [torch.ones(4, len(tokens.ids), dtype=torch.bool) for _ in layers]
    probs = traced_probs(model, tokens, rows=4, noise=_noise(tokens, model), modules=layers,
                         clean=states, restore=restore)  # fmt: skip
    torch.testing.assert_close(probs, torch.full((4,), p_clean), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2"])
def test_tracer_effects_match_full_restored_runs(model_type, tiny_tokenizer):
    """The tracer's shortcut (resuming from the corrupted states below the restored
    layers, batching jobs) against plain full runs, one (layer, position) at a time."""
    model = make_tiny_model(model_type, tiny_tokenizer)
    config = TraceConfig(samples=3, window=3, min_prob=0.0, noise_factor=10.0, rows_per_pass=7)
    tracer = Tracer(LoadedModel(model, tiny_tokenizer, "tiny"), config)
    tokens = fact_tokens(tiny_tokenizer, LONG_SUBJECT)
    trace = tracer.trace(tokens, seed=5)
    start, stop = tokens.subject
    noise = subject_noise(3, stop - start, model.config.hidden_size, tracer.noise_std, 5)
    mlps = [mlp_out_module(model, i) for i in range(TINY_LAYERS)]
    _, states = _clean(model, tokens, mlps)
    corrupted = float(traced_probs(model, tokens, rows=3, noise=noise).mean())
    assert trace.corrupted_prob == pytest.approx(corrupted, rel=1e-5)
    assert torch.all(trace.effects["single"][:, :start] == 0)
    for layer in (0, 2, TINY_LAYERS - 1):
        for position in (start, stop - 1, len(tokens.ids) - 1):
            for variant, width in (("single", 1), ("window", 3)):
                restore = [torch.zeros(3, len(tokens.ids), dtype=torch.bool) for _ in mlps]
                low = layer - width // 2  # ROME's window, centred on the layer
                for restored in range(max(0, low), min(TINY_LAYERS, low + width)):
                    restore[restored][:, position] = True
                p = traced_probs(model, tokens, rows=3, noise=noise, modules=mlps,
                                 clean=states, restore=restore).mean()  # fmt: skip
                expected = float(p) - corrupted
                got = float(trace.effects[variant][layer, position])
                assert got == pytest.approx(expected, rel=1e-4, abs=1e-7), (variant, layer)


def test_noise_is_reproducible_with_a_seed(tiny_tokenizer):
    a = subject_noise(10, 2, 64, 3.0, seed=7)
    assert torch.equal(a, subject_noise(10, 2, 64, 3.0, seed=7))
    assert not torch.equal(a, subject_noise(10, 2, 64, 3.0, seed=8))
    big = subject_noise(200, 5, 64, 3.0, seed=0)
    assert float(big.std()) == pytest.approx(3.0, rel=0.02)
    model = make_tiny_model("llama", tiny_tokenizer)
    tracer = Tracer(LoadedModel(model, tiny_tokenizer, "tiny"), TraceConfig(samples=4))
    tokens = fact_tokens(tiny_tokenizer, FACT)
    first, second = tracer.trace(tokens, seed=3), tracer.trace(tokens, seed=3)
    assert torch.equal(first.effects["window"], second.effects["window"])
    assert first.corrupted_prob == second.corrupted_prob


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_noise_scale_is_the_std_of_the_embedding_outputs(model_type, tiny_tokenizer):
    model = make_tiny_model(model_type, tiny_tokenizer)
    weight = model.get_input_embeddings().weight.detach().double()
    # Gemma multiplies its embeddings by sqrt(hidden size) inside the embedding module.
    scale = model.config.hidden_size**0.5 if model_type == "gemma3_text" else 1.0
    tracer = Tracer(LoadedModel(model, tiny_tokenizer, "tiny"), TraceConfig(noise_factor=3.0))
    assert tracer.embedding_std == pytest.approx(float((weight * scale).std()), rel=1e-6)
    assert tracer.noise_std == pytest.approx(3.0 * tracer.embedding_std)


def test_position_groups_follow_rome():
    # prefix 0-1, subject 2-5, then 6, 7, 8, and the last token 9
    assert position_groups((2, 6), 10) == [[2], [3, 4], [5], [6], [7, 8], [9]]
    # a one-token subject right before the last token: no middle, no subsequent tokens
    assert position_groups((3, 4), 5) == [[3], [], [3], [], [], [4]]
    assert len(POSITION_GROUPS) == 6


def test_windows_and_the_suggestion():
    assert restored_layers(0, 5, 30) == [0, 1, 2]
    assert restored_layers(10, 5, 30) == [8, 9, 10, 11, 12]
    assert restored_layers(29, 5, 30) == [27, 28, 29]
    assert restored_layers(4, 1, 30) == [4]
    assert restored_layers(4, 4, 30) == [2, 3, 4, 5]
    curve = [0.0] * 12
    curve[1] = 0.9  # an edge window (clipped) is no candidate
    curve[6], curve[7] = 0.5, 0.4
    assert suggest_window(curve, 5) == [4, 5, 6, 7, 8]
    assert suggest_window(curve, 20) == list(range(12))


def test_facts_files(tmp_path):
    good = tmp_path / "facts.jsonl"
    good.write_text(json.dumps({"subject": "Rome", "prompt": "Rome is in", "attribute": "Italy",
                                "extra": 1}) + "\n")  # fmt: skip
    assert load_facts(good) == [KnownFact("Rome", "Rome is in", "Italy")]
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"subject": "Rome", "prompt": "Rome is in"}]))
    with pytest.raises(TraceInputError, match="record 0 .* lacks attribute"):
        load_facts(missing)
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps([{"subject": "Paris", "prompt": "Rome is in", "attribute": "x"}]))
    with pytest.raises(TraceInputError, match="does not contain the subject"):
        load_facts(outside)


def _known_fact(model, tokenizer) -> KnownFact:
    """A fact the random model 'knows': its own top-1 continuation of a prompt."""
    prompts = (
        ("Toronto", "The city of Toronto is in the"),
        ("Paris", "Paris is the"),
        ("Rome", "People in Rome speak"),
        ("Milan", "Milan is a city in"),
    )
    for subject, prompt in prompts:
        with torch.no_grad():
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            top = int(model(input_ids=ids).logits[0, -1].argmax())
        fact = KnownFact(subject, prompt, tokenizer.decode([top]))
        try:
            if fact_tokens(tokenizer, fact).target == top:
                return fact
        except ValueError:
            continue
    raise AssertionError("no prompt's top-1 token round-trips through the tokenizer")


def test_cli_writes_the_json_and_the_png(tmp_path, tiny_tokenizer):
    model = make_tiny_model("llama", tiny_tokenizer)
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    known = _known_fact(model, tiny_tokenizer)
    facts = tmp_path / "facts.json"
    records = [
        {"subject": known.subject, "prompt": known.prompt, "attribute": known.attribute},
        {"subject": "Rome", "prompt": "Rome is the capital of", "attribute": "zzz"},
    ]
    facts.write_text(json.dumps(records))
    out = tmp_path / "trace"
    result = CliRunner().invoke(app, ["trace", str(folder), "--out", str(out), "--facts",
                                      str(facts), "--samples", "2", "--window", "3",
                                      "--min-prob", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads((out / "trace.json").read_text())
    assert data["counts"]["facts_read"] == 2
    assert data["counts"]["facts_traced"] == 1
    assert len(data["last_subject_token"]["single"]) == TINY_LAYERS
    assert len(data["tables"]["window"]) == len(POSITION_GROUPS)
    assert len(data["suggested_layers"]) == 3
    assert (out / "trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = CliRunner().invoke(app, ["trace", str(folder), "--out", str(out), "--facts",
                                   str(facts), "--samples", "0"])  # fmt: skip
    assert bad.exit_code != 0


def test_bf16_trace_runs_under_autocast_and_stays_close_to_fp32(tiny_tokenizer):
    """--precision bf16: every traced pass runs under bfloat16 autocast (a linear layer's
    output is bf16 inside), and the probabilities stay close to the float32 trace's."""
    model = make_tiny_model("llama", tiny_tokenizer)
    loaded = LoadedModel(model, tiny_tokenizer, "tiny")
    tokens = fact_tokens(tiny_tokenizer, LONG_SUBJECT)
    seen: list[torch.dtype] = []
    handle = mlp_out_module(model, 0).register_forward_hook(
        lambda _m, _a, out: seen.append(out.dtype)
    )
    try:
        traces = {
            bf16: Tracer(loaded, TraceConfig(samples=2, window=3, min_prob=0.0, bf16=bf16)).trace(
                tokens, seed=1
            )
            for bf16 in (False, True)
        }
    finally:
        handle.remove()
    assert torch.float32 in seen and torch.bfloat16 in seen
    assert traces[True].clean_prob == pytest.approx(traces[False].clean_prob, rel=0.05)
    torch.testing.assert_close(
        traces[True].effects["window"], traces[False].effects["window"], rtol=0, atol=0.02
    )
