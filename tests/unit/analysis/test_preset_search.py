"""sphere-edit preset: the candidate windows, the lr rule, the residual states against
hooks written here, and the command on a tiny model writing a preset --preset reads."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from sphere_edit.analysis.preset_search import (
    LR_RULES,
    REFERENCE_LR,
    REFERENCE_SIZES,
    REFERENCE_STEPS,
    SearchConfig,
    candidate_windows,
    coordinate_size,
    rank_key,
    scaled_lr,
    subject_last_states,
)
from sphere_edit.cli.app import app
from sphere_edit.editing.build import build_session
from sphere_edit.editing.presets import load_preset_file
from tests import FIXTURES_DIR
from tests.tiny_models import TINY_LAYERS, make_tiny_model
from tests.unit._helpers import decoder_layer, tiny_loaded
from tests.unit.analysis.test_tracing import _known_fact


def test_candidate_windows_are_the_suggestion_then_its_neighbours():
    assert candidate_windows([5, 6, 7], 3, 18) == [[5, 6, 7], [3, 4, 5], [7, 8, 9]]
    assert candidate_windows([5, 6, 7], 5, 18) == [
        [5, 6, 7], [3, 4, 5], [7, 8, 9], [1, 2, 3], [9, 10, 11],
    ]  # fmt: skip
    # At the edges a shift is clipped into the model, and a repeat is left out.
    assert candidate_windows([0, 1, 2], 3, 18) == [[0, 1, 2], [2, 3, 4], [4, 5, 6]]
    assert candidate_windows([2, 3], 5, 4) == [[2, 3], [0, 1]]  # shifts are even
    assert candidate_windows([0, 1, 2, 3], 3, 4) == [[0, 1, 2, 3]]
    assert candidate_windows([2, 3, 4], 3, 18, step=1) == [[2, 3, 4], [1, 2, 3], [3, 4, 5]]
    assert candidate_windows([0, 1, 2], 3, 18, step=1) == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]


def test_the_lr_rule_keeps_lr_times_steps_over_one_coordinates_size():
    for rule in LR_RULES:
        assert scaled_lr(REFERENCE_SIZES[rule], REFERENCE_STEPS, rule) == (
            pytest.approx(REFERENCE_LR)
        )
        # lr * steps / size is the same for any model.
        for size, steps in ((12.4, 25), (300.0, 10), (0.05, 50)):
            lr = scaled_lr(size, steps, rule)
            assert lr * steps / size == pytest.approx(
                REFERENCE_LR * REFERENCE_STEPS / REFERENCE_SIZES[rule]
            )


def test_coordinate_size_is_the_median_magnitude_or_the_rms():
    # One massive coordinate moves the RMS far and the median not at all.
    states = torch.tensor([[1.0, -2.0, 3.0, 1000.0], [-4.0, 1.0, 1.0, 2.0]])
    # torch's median of 4 values is the lower middle one: |.| sorted 1 2 3 1000 -> 2; 1 1 2 4 -> 1
    assert coordinate_size(states, "median") == pytest.approx((2.0 + 1.0) / 2)
    rms = (states.norm(dim=1) / 2.0).mean()
    assert coordinate_size(states, "rms") == pytest.approx(float(rms))
    with pytest.raises(ValueError, match="lr rule"):
        coordinate_size(states, "mean")


def test_residual_states_are_the_decoder_layer_outputs_at_the_last_subject_token(
    tiny_tokenizer,
):
    loaded = tiny_loaded(tiny_tokenizer, "llama")
    prompts = [("{} is located in", "Toronto"), ("The mother tongue of {} is", "Marie Curie")]
    layer = 2
    expected = []
    for prompt, subject in prompts:
        seen = {}
        handle = decoder_layer(loaded.model, layer).register_forward_hook(
            lambda _m, _a, out, seen=seen: seen.__setitem__(
                "h", out[0] if isinstance(out, tuple) else out
            )
        )
        text = prompt.replace("{}", subject)
        ids = tiny_tokenizer(text, return_tensors="pt")["input_ids"]
        # The last token whose decoded prefix still lies within the subject.
        end = len(prompt.partition("{}")[0] + subject)
        last = max(
            i for i in range(ids.shape[1]) if len(tiny_tokenizer.decode(ids[0, : i + 1])) <= end
        )
        try:
            with torch.no_grad():
                loaded.model(input_ids=ids)
        finally:
            handle.remove()
        expected.append(seen["h"][0, last])
    states = subject_last_states(loaded, prompts, layer)
    torch.testing.assert_close(states, torch.stack(expected))


def test_candidates_rank_by_efficacy_then_paraphrase_then_specificity():
    a = {"efficacy": 1.0, "generalization": 0.2, "specificity": 0.9}
    b = {"efficacy": 1.0, "generalization": 0.4, "specificity": 0.1}
    c = {"efficacy": 0.9, "generalization": 1.0, "specificity": 1.0}
    assert max([a, b, c], key=rank_key) is b
    assert max([c, a], key=rank_key) is a


def test_search_config_refuses_bad_values():
    with pytest.raises(ValueError, match="--cases"):
        SearchConfig(cases=0)
    with pytest.raises(ValueError, match="--window-step"):
        SearchConfig(window_step=0)
    with pytest.raises(ValueError, match="--mom2-weights"):
        SearchConfig(mom2_weights=())
    with pytest.raises(ValueError, match="--lr-scales"):
        SearchConfig(lr_scales=(1.0, 0.0))
    with pytest.raises(ValueError, match="--lr-rule"):
        SearchConfig(lr_rule="mean")


def test_the_preset_command_writes_a_preset_that_preset_reads(tmp_path, tiny_tokenizer):
    model = make_tiny_model("llama", tiny_tokenizer)
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    known = _known_fact(model, tiny_tokenizer)
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"subject": known.subject, "prompt": known.prompt,
                                  "attribute": known.attribute}]))  # fmt: skip
    out = tmp_path / "tiny.json"
    result = CliRunner().invoke(app, [
        "preset", str(folder), "--out", str(out), "--facts", str(facts), "--n-facts", "1",
        "--samples", "1", "--min-prob", "0", "--window", "2", "--windows", "2",
        "--dataset", str(FIXTURES_DIR / "counterfact_rome.json"), "--cases", "2",
        "--mom2-weights", "100,1000", "--lr-scales", "1,0.5", "--stats-tokens", "1000",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    candidates = data["measurements"]["candidates"]
    assert len(candidates) == 2 * 2 * 2  # windows x lr factors x weights
    for c in candidates:  # the factor multiplies the window's own rule lr
        rule = [d["lr"] for d in candidates if d["layers"] == c["layers"] and d["lr_scale"] == 1]
        assert c["lr"] == pytest.approx(c["lr_scale"] * rule[0], rel=1e-12)
        size = c["coordinate_size"]["median"]  # the default rule
        assert rule[0] == pytest.approx(scaled_lr(size, REFERENCE_STEPS, "median"), rel=1e-12)
    assert {c["lr_scale"] for c in candidates} == {1.0, 0.5}
    assert {tuple(c["layers"]) for c in candidates} == {
        tuple(w)
        for w in candidate_windows(
            data["measurements"]["trace"]["suggested_layers"], 2, TINY_LAYERS
        )  # fmt: skip
    }
    best = max(candidates, key=rank_key)
    assert data["layers"] == best["layers"]
    assert data["memit"]["mom2_weight"] == best["mom2_weight"]
    assert data["target"]["lr"] == best["lr"]
    assert data["identity"]["num_hidden_layers"] == TINY_LAYERS
    assert (tmp_path / "tiny-trace" / "trace.json").exists()
    preset = load_preset_file(out)
    loaded = tiny_loaded(tiny_tokenizer, "llama")
    session = build_session(loaded, "memit", preset=preset, stats_tokens=1000, progress=False,
                            log=lambda _line: None)  # fmt: skip
    assert session.layers == best["layers"]
    assert session.method.mom2_weight == best["mom2_weight"]
    assert session.target.lr == best["lr"]
    shown = CliRunner().invoke(app, ["energy", "--model", str(folder), "--preset", str(out)])
    assert shown.exit_code == 0, shown.output
    layers = [n for n in range(TINY_LAYERS) if f"model.layers.{n}.mlp.down_proj" in shown.output]
    assert layers == best["layers"]
