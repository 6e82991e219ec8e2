"""The method registry: declared options and their checks, preset sections keyed by
method, inherited sections, SPHERE strengths, and presets matched by model identity."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
from transformers import Gemma3TextConfig, LlamaConfig

from sphere_edit.editing.presets import (
    PresetError,
    describe_choice,
    generic_preset,
    load_preset,
    model_identity,
    parse_preset,
    preset_for,
)
from sphere_edit.methods import (
    FT,
    MEMIT,
    PRUNE,
    RECT,
    ROME,
    AlphaEdit,
    MethodOptionError,
    Option,
    UltraEdit,
    get_method,
    make_method,
    method_names,
    register_method,
    unregister_method,
)
from sphere_edit.methods.registry import method_help

BUILT_IN = ["memit", "alphaedit", "ft", "rome", "rect", "prune", "ultraedit"]


def test_the_built_in_methods_are_registered_in_order():
    assert method_names() == BUILT_IN
    shown = method_help()
    assert shown.startswith("memit (least-squares update of several layers")
    assert shown.endswith("Add '+sphere' for SPHERE.")
    assert [shown.find(f"{n} (") for n in BUILT_IN] == sorted(
        shown.find(f"{n} (") for n in BUILT_IN
    )


@pytest.mark.parametrize(
    ("option", "good", "bad"),
    [
        (Option("x", float, 1.0, "", low=0), [0, 0.0, 3, 1e9], [-1e-12, -1]),
        (Option("x", float, 1.0, "", low=0, low_open=True), [1e-300, 2], [0, -1]),
        (Option("x", float, 0.5, "", low=0, high=1, low_open=True), [1, 1e-9], [0, 1.0000001]),
        (Option("x", float, 0.5, "", low=0, high=1, high_open=True), [0, 0.999], [1, -0.1]),
        (Option("x", float, 1.0, "", high=2), [-5, 2], [2.5]),
        (Option("x", int, 1, "", low=1), [1, 7, 3.0], [0, 2.5]),
        (Option("x", float, 1.0, "", nullable=True), [None, -3], []),
    ],
)
def test_option_bounds(option, good, bad):
    for value in good:
        assert option.check("m", value) is value
    for value in bad:
        with pytest.raises(MethodOptionError, match=f"got {value!r}"):
            option.check("m", value)


@pytest.mark.parametrize("value", ["abc", "1", True, None, [1], math.inf, math.nan])
def test_non_numbers_are_rejected(value):
    with pytest.raises(MethodOptionError, match="'x' of m must be a number"):
        Option("x", float, 1.0, "").check("m", value)


def test_range_text():
    assert Option("x", float, 1.0, "", low=0, high=1, low_open=True).range_text() == (
        "a number in (0, 1]"
    )
    assert Option("x", int, 1, "", low=1).range_text() == "an integer >= 1"
    assert Option("x", float, 1.0, "", low=0, low_open=True, nullable=True).range_text() == (
        "a number > 0 or null"
    )


def test_validation_names_the_option_and_the_valid_ones():
    with pytest.raises(MethodOptionError, match="'nullspace_threshold' of alphaedit"):
        make_method("alphaedit", nullspace_threshold=-2)
    with pytest.raises(MethodOptionError, match="valid: nullspace_threshold, l2$"):
        make_method("alphaedit", threshold=0.1)
    with pytest.raises(MethodOptionError, match="'l2' of alphaedit must be a number >= 0"):
        make_method("alphaedit", l2="abc")
    with pytest.raises(ValueError, match="unknown method 'bogus'; choose one of memit"):
        get_method("bogus")


def test_values_reach_the_method_unchanged():
    # An int stays an int, so the journal header reads as it did before the check.
    method = make_method("memit", mom2_weight=1000)
    assert method == MEMIT(mom2_weight=1000)
    assert type(method.mom2_weight) is int
    assert make_method("ft", epsilon=None).epsilon is None


def test_declarations_follow_the_dataclass_fields():
    for name in BUILT_IN:
        info = get_method(name)
        assert info.factory().describe() == {
            "method": name,
            **{o.name: o.default for o in info.options},
        }

    @dataclass(frozen=True)
    class Drifted:
        name: ClassVar[str] = "drifted"
        a: float = 1.0

    with pytest.raises(ValueError, match="declared options"):
        register_method(help="", options=(Option("a", float, 2.0, ""),))(Drifted)
    assert "drifted" not in method_names()
    with pytest.raises(ValueError, match="registered already"):
        register_method(help="", options=(Option("mom2_weight", float, 15000.0, ""),))(MEMIT)


def test_single_layer_and_sphere_alpha_declarations():
    assert [n for n in BUILT_IN if get_method(n).single_layer] == ["ft", "rome"]
    alphas = {n: get_method(n).sphere_alpha for n in BUILT_IN}
    assert alphas == {n: 0.5 if n == "alphaedit" else 0.8 for n in BUILT_IN}
    assert [get_method(n).inherits for n in ("rect", "prune")] == [("memit",), ("memit",)]


# What the shipped presets gave each method before the registry: the same arguments make
# the same method, hence the same edits.
BEFORE = {
    "memit": MEMIT(mom2_weight=1000),
    "alphaedit": AlphaEdit(nullspace_threshold=0.02, l2=10),
    "ft": FT(epsilon=0.002, lr=0.0005, steps=25),
    "rome": ROME(),
    "rect": RECT(keep_fraction=0.4, mom2_weight=1000),
    "prune": PRUNE(mom2_weight=1000, log_base=2.718281828459045),
    # Chosen on SmolLM2 on 2026-12-02 (docs/design.md, UltraEdit).
    "ultraedit": UltraEdit(lr=3e-4, ridge=1.0),
}
# The lr measured on Gemma-3 on 2026-12-03 (docs/results.md, UltraEdit on Gemma-3-270M).
OWN = {"gemma3-270m": {"ultraedit": UltraEdit(lr=3e-5, ridge=1.0)}}


@pytest.mark.parametrize(("preset_name", "layer"), [("smollm2-135m", 9), ("gemma3-270m", 5)])
def test_shipped_presets_give_the_same_methods(preset_name, layer):
    preset = load_preset(preset_name)
    for name, expected in (BEFORE | OWN.get(preset_name, {})).items():
        method = make_method(name, **preset.method_options(name))
        assert method == expected, name
        assert method.describe() == expected.describe(), name
        assert preset.sphere_alpha(name) == (0.5 if name == "alphaedit" else 0.8)
    assert preset.single_layer("ft") == preset.single_layer("rome") == layer
    assert set(preset.methods) == set(BUILT_IN)


def test_preset_sections():
    data = {
        "layers": [1, 2],
        "memit": {"mom2_weight": 7},
        "rect": {"keep_fraction": 0.2},
        "rome": {"layer": 1},
        "sphere": {"alpha_other": 0.3, "alpha_alphaedit": 0.1},
    }
    preset = parse_preset("p", data)
    assert preset.method_options("rect") == {"mom2_weight": 7, "keep_fraction": 0.2}
    assert preset.method_options("prune") == {"mom2_weight": 7}
    assert preset.method_options("rome") == {}
    assert preset.single_layer("rome") == 1
    assert preset.single_layer("ft") == 2  # the middle of the window
    assert preset.sphere_alpha("memit") == 0.3 and preset.sphere_alpha("alphaedit") == 0.1
    # The own section wins over the inherited one.
    both = parse_preset(
        "p", {"layers": [1], "memit": {"mom2_weight": 7}, "prune": {"mom2_weight": 9}}
    )
    assert both.method_options("prune") == {"mom2_weight": 9}
    assert generic_preset(8).sphere_alpha("alphaedit") == 0.5


def test_a_section_naming_no_method_is_an_error():
    with pytest.raises(PresetError, match="preset p: section 'memitt' names no known method"):
        parse_preset("p", {"layers": [1], "memitt": {"mom2_weight": 7}})


def test_a_bad_option_in_a_section_is_an_error():
    with pytest.raises(PresetError, match="preset p, section 'ft': method option 'lr' of ft"):
        parse_preset("p", {"layers": [1], "ft": {"layer": 1, "lr": -1}})
    with pytest.raises(PresetError, match="section 'memit': .* memit has no such option"):
        parse_preset("p", {"layers": [1], "memit": {"keep_fraction": 0.5}})


def test_a_section_of_a_registered_method_is_read():
    @dataclass(frozen=True)
    class Extra:
        name: ClassVar[str] = "extra_section_method"
        a: float = 1.0

    register_method(help="", options=(Option("a", float, 1.0, "", low=0),))(Extra)
    try:
        preset = parse_preset("p", {"layers": [1], "extra_section_method": {"a": 3}})
        assert make_method("extra_section_method", **preset.method_options(Extra.name)).a == 3
    finally:
        unregister_method(Extra.name)
    with pytest.raises(PresetError, match="'extra_section_method'"):
        parse_preset("p", {"layers": [1], "extra_section_method": {"a": 3}})


SMOLLM2 = LlamaConfig(
    hidden_size=576, num_hidden_layers=30, intermediate_size=1536, vocab_size=49152,
    num_attention_heads=9, num_key_value_heads=3,
)  # fmt: skip
GEMMA3 = Gemma3TextConfig(
    hidden_size=640, num_hidden_layers=18, intermediate_size=2048, vocab_size=262144
)


def test_a_folder_of_a_shipped_model_gets_its_preset_by_identity():
    chosen = preset_for("/models/my-smollm2", 30, SMOLLM2)
    assert chosen.name == "smollm2-135m"
    assert describe_choice(chosen) == "preset: smollm2-135m (matched by architecture fingerprint)"
    assert preset_for("./gemma", 18, GEMMA3).name == "gemma3-270m"
    # A name match needs no config, and is preferred.
    assert describe_choice(preset_for("smollm2-135m", 30)) == (
        "preset: smollm2-135m (matched by name)"
    )
    other = LlamaConfig(**{**SMOLLM2.to_dict(), "intermediate_size": 1024})
    assert preset_for("/models/other", 30, other).name == "generic"


def test_identity_match_with_a_tiny_model(tiny_tokenizer):
    from tests.tiny_models import make_tiny_model

    config = make_tiny_model("llama", tiny_tokenizer).config
    entry = parse_preset("tiny", {"layers": [1], "identity": model_identity(config)})
    assert entry.identity["model_type"] == "llama"
    candidates = [load_preset("smollm2-135m"), entry]
    chosen = preset_for("/tmp/somewhere", config.num_hidden_layers, config, presets=candidates)
    assert (chosen.name, chosen.matched) == ("tiny", "architecture fingerprint")
    deeper = type(config)(**{**config.to_dict(), "num_hidden_layers": 5})
    assert preset_for("/tmp/somewhere", 5, deeper, presets=candidates).name == "generic"
    assert preset_for("/tmp/somewhere", 4, None, presets=candidates).name == "generic"
