"""build_session: the preset it chooses (and says it chose), method options from the
preset's sections, and their checks."""

from __future__ import annotations

from dataclasses import replace

import pytest

from sphere_edit.editing import presets
from sphere_edit.editing.build import MethodSpec, build_session
from sphere_edit.editing.presets import model_identity, parse_preset
from sphere_edit.methods import FT, MethodOptionError, UltraEdit
from tests.unit._helpers import tiny_loaded


def _tiny_preset(config, **sections):
    data = {"layers": [1, 2, 3], "identity": model_identity(config), **sections}
    return parse_preset("tiny-test", data)


def _build(loaded, spec, **kwargs):
    lines: list[str] = []
    session = build_session(loaded, spec, progress=False, log=lines.append, **kwargs)
    return session, lines


def test_a_model_matched_by_identity_gets_the_preset(tiny_tokenizer, monkeypatch):
    loaded = tiny_loaded(tiny_tokenizer, "llama")
    entry = _tiny_preset(
        loaded.model.config,
        ft={"layer": 1, "steps": 3},
        sphere={"eta": 0.25, "alpha_other": 0.6},
    )
    shipped = presets.shipped_presets()
    monkeypatch.setattr(presets, "shipped_presets", lambda: [*shipped, entry])
    session, lines = _build(loaded, "ft+sphere")
    assert lines[0] == "preset: tiny-test (matched by architecture fingerprint)"
    assert session.method == FT(steps=3)
    assert session.layers == [1]
    assert (session.transform.eta, session.transform.alpha) == (0.25, 0.6)
    assert session.header()["preset"] == "tiny-test"


def test_a_band_method_takes_the_presets_band_else_its_own(tiny_tokenizer, monkeypatch):
    loaded = tiny_loaded(tiny_tokenizer, "llama")
    session, _ = _build(loaded, "ultraedit")  # the generic preset: the band scaled to depth
    assert session.layers == UltraEdit.default_layers(loaded.layout.num_layers)
    entry = _tiny_preset(loaded.model.config, ultraedit={"lr": 0.25, "layers": [0, 2]})
    shipped = presets.shipped_presets()
    monkeypatch.setattr(presets, "shipped_presets", lambda: [*shipped, entry])
    session, _ = _build(loaded, "ultraedit")
    assert session.layers == [0, 2]
    assert session.method == UltraEdit(lr=0.25)
    session, _ = _build(loaded, "ultraedit", layers=[1])
    assert session.layers == [1]
    session, _ = _build(loaded, "memit")  # the MEMIT window is not the band
    assert session.layers == [1, 2, 3]


def test_an_unknown_model_gets_the_generic_preset(tiny_tokenizer):
    loaded = tiny_loaded(tiny_tokenizer, "llama")
    session, lines = _build(loaded, "ft")
    assert lines[0].startswith("preset: generic (no preset for this model")
    assert session.method == FT()


def test_method_overrides_are_checked(tiny_tokenizer):
    loaded = tiny_loaded(tiny_tokenizer, "llama")
    with pytest.raises(MethodOptionError, match="'steps' of ft must be an integer >= 1, got 0"):
        _build(loaded, "ft", method_overrides={"steps": 0})
    with pytest.raises(MethodOptionError, match="ft has no such option; valid: epsilon, lr"):
        _build(loaded, MethodSpec.parse("ft"), method_overrides={"step": 2})


def test_a_bad_preset_section_is_checked(tiny_tokenizer):
    loaded = tiny_loaded(tiny_tokenizer, "llama")
    preset = replace(_tiny_preset(loaded.model.config), methods={"ft": {"lr": "fast"}})
    with pytest.raises(MethodOptionError, match="'lr' of ft must be a number > 0, got 'fast'"):
        _build(loaded, "ft", preset=preset)
