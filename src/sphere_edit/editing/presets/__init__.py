"""Per-model defaults (edited layers, target optimisation, method options), stored as JSON
files in ``sphere_edit/editing/presets/``. A preset lists the model names it is for and
the architecture identity of the model (:func:`model_identity`), which also matches a
local folder holding the same model; a model with no preset gets a generic one derived
from its depth. Every other section is a registered method's options."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

from ...methods import get_method, method_names

# The entries of a preset file that are not method sections.
GENERAL_KEYS = ("models", "identity", "layers", "target", "sphere", "stats_tokens", "notes")
GENERAL_KEYS += ("stats_pieces", "template_tokens")
# The config entries that identify a model's architecture: a local folder or another hub
# id holding the same weights has the same ones, without any file beyond its config.
IDENTITY_KEYS = (
    "model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size",
)  # fmt: skip


class PresetError(ValueError):
    """A preset file that cannot be read as it is."""


def model_identity(config: Any) -> dict[str, Any]:
    """The :data:`IDENTITY_KEYS` of a model's config (a ``PretrainedConfig``)."""
    return {key: getattr(config, key, None) for key in IDENTITY_KEYS}


@dataclass(frozen=True)
class Preset:
    """``methods`` holds each method's section, keyed by method name; ``identity`` the
    :func:`model_identity` of the model it is for; ``matched`` how :func:`preset_for`
    chose it (empty when it was loaded by name)."""

    name: str
    models: tuple[str, ...]
    layers: tuple[int, ...]
    target: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    sphere: dict[str, Any] = field(default_factory=dict)
    stats_tokens: int = 100_000
    # The statistics' and templates' recipes (StatsRecipe.parse, parse_template_tokens).
    stats_pieces: str = "whole"
    template_tokens: str | int = "authors"
    notes: str = ""
    identity: dict[str, Any] = field(default_factory=dict)
    matched: str = ""

    def section(self, method: str) -> dict[str, Any]:
        """The method's own section (empty when the preset has none)."""
        return dict(self.methods.get(method) or {})

    def method_options(self, method: str) -> dict[str, Any]:
        """The method's options: its section without ``layer``, on top of the options it
        declares of the sections it inherits (RECT, PRUNE: MEMIT's)."""
        info = get_method(method)
        options: dict[str, Any] = {}
        for inherited in info.inherits:
            section = self.section(inherited)
            options.update({k: v for k, v in section.items() if k in info.option_names})
        options.update(self.section(method))
        options.pop("layer", None)
        return options

    def single_layer(self, method: str) -> int:
        """The layer a one-layer method (ROME, FT) edits: its section's ``layer``, else
        the middle of the MEMIT window."""
        section = self.section(method)
        if "layer" in section:
            return int(section["layer"])
        return self.layers[len(self.layers) // 2]

    def sphere_alpha(self, method: str) -> float:
        """The SPHERE strength: the preset's entry for the method, else its default."""
        info = get_method(method)
        return float(self.sphere.get(info.sphere_alpha_key, info.sphere_alpha))

    def sphere_eta(self) -> float:
        return float(self.sphere.get("eta", 0.5))


def parse_preset(name: str, data: Mapping[str, Any]) -> Preset:
    """A preset from the contents of its JSON file; a section that is neither a general
    entry nor a registered method, or holds an option its method does not take, is an
    error naming it."""
    known = method_names()
    for key in data:
        if key not in GENERAL_KEYS and key not in known:
            raise PresetError(
                f"preset {name}: section {key!r} names no known method; methods: "
                f"{', '.join(known)}; other entries: {', '.join(GENERAL_KEYS)}"
            )
        if key in known:
            section = {k: v for k, v in data[key].items() if k != "layer"}
            try:
                get_method(key).validate(section)
            except ValueError as error:
                raise PresetError(f"preset {name}, section {key!r}: {error}") from None
    return Preset(
        name=name,
        models=tuple(data.get("models", [])),
        layers=tuple(data["layers"]),
        target=data.get("target", {}),
        methods={key: dict(data[key]) for key in known if key in data},
        sphere=data.get("sphere", {}),
        stats_tokens=int(data.get("stats_tokens", 100_000)),
        stats_pieces=str(data.get("stats_pieces", "whole")),
        template_tokens=data.get("template_tokens", "authors"),
        notes=data.get("notes", ""),
        identity=dict(data.get("identity", {})),
    )


def _read(name: str) -> Preset:
    text = (
        resources.files("sphere_edit.editing.presets").joinpath(f"{name}.json").read_text("utf-8")
    )
    return parse_preset(name, json.loads(text))


def available_presets() -> list[str]:
    folder = resources.files("sphere_edit.editing.presets")
    names = (p.name for p in folder.iterdir())
    return sorted(n.removesuffix(".json") for n in names if n.endswith(".json"))


def shipped_presets() -> list[Preset]:
    """Every preset file of the package."""
    return [_read(name) for name in available_presets()]


def preset_for(
    model_name: str,
    num_layers: int,
    config: Any = None,
    *,
    presets: Iterable[Preset] | None = None,
) -> Preset:
    """The preset whose ``models`` list holds ``model_name`` exactly, else the one whose
    ``identity`` is the :func:`model_identity` of ``config``, else a generic one;
    ``matched`` says which. ``presets``: the candidates (default: the shipped ones)."""
    candidates = shipped_presets() if presets is None else list(presets)
    for preset in candidates:
        if model_name in preset.models or model_name == preset.name:
            return replace(preset, matched="name")
    if config is not None:
        identity = model_identity(config)
        for preset in candidates:
            if preset.identity and preset.identity == identity:
                return replace(preset, matched="architecture fingerprint")
    return generic_preset(num_layers)


def describe_choice(preset: Preset) -> str:
    """One line saying which preset was chosen and why, e.g. ``preset: smollm2-135m
    (matched by architecture fingerprint)``."""
    if preset.matched:
        return f"preset: {preset.name} (matched by {preset.matched})"
    return f"preset: {preset.name}" + (f" ({preset.notes})" if preset.notes else "")


def load_preset(name: str) -> Preset:
    if name not in available_presets():
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(available_presets())}")
    return _read(name)


def generic_preset(num_layers: int) -> Preset:
    """Five consecutive layers starting at an eighth of the depth: MEMIT's choice on GPT-J
    (3–8 of 28) and Llama-3-8B (4–8 of 32), scaled to the model."""
    start = max(1, round(num_layers / 8))
    count = min(5, max(1, num_layers - start - 1))
    return Preset(
        name="generic",
        models=(),
        layers=tuple(range(start, start + count)),
        notes="no preset for this model: layers chosen by depth",
    )
