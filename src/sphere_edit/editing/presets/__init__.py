"""Per-model defaults (edited layers, target optimisation, method options), stored as JSON
files in ``sphere_edit/presets/``. A preset lists the model names it is for; a model with
no preset gets a generic one derived from its depth."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

# Their options include MEMIT's (mom2_weight): a preset's "memit" section applies to them.
BUILT_ON_MEMIT = ("rect", "prune")
METHOD_SECTIONS = ("memit", "alphaedit", "ft", "rome", "rect", "prune")


@dataclass(frozen=True)
class Preset:
    name: str
    models: tuple[str, ...]
    layers: tuple[int, ...]
    target: dict[str, Any] = field(default_factory=dict)
    memit: dict[str, Any] = field(default_factory=dict)
    alphaedit: dict[str, Any] = field(default_factory=dict)
    ft: dict[str, Any] = field(default_factory=dict)
    rome: dict[str, Any] = field(default_factory=dict)
    rect: dict[str, Any] = field(default_factory=dict)
    prune: dict[str, Any] = field(default_factory=dict)
    sphere: dict[str, Any] = field(default_factory=dict)
    stats_tokens: int = 100_000
    notes: str = ""

    def method_options(self, method: str) -> dict[str, Any]:
        """The method's options: its section without ``layer``, on top of the MEMIT
        section for the methods built on MEMIT's solve (RECT, PRUNE)."""
        options = dict(self.memit) if method in BUILT_ON_MEMIT else {}
        options.update(getattr(self, method, {}) or {})
        options.pop("layer", None)
        return options

    def single_layer(self, method: str) -> int:
        """The layer a one-layer method (ROME, FT) edits: its section's ``layer``, else
        the middle of the MEMIT window."""
        section = getattr(self, method, {}) or {}
        if "layer" in section:
            return int(section["layer"])
        return self.layers[len(self.layers) // 2]

    def sphere_alpha(self, method: str) -> float:
        key = "alpha_alphaedit" if method == "alphaedit" else "alpha_other"
        return float(self.sphere.get(key, 0.5 if method == "alphaedit" else 0.8))

    def sphere_eta(self) -> float:
        return float(self.sphere.get("eta", 0.5))


def _read(name: str) -> Preset:
    text = (
        resources.files("sphere_edit.editing.presets").joinpath(f"{name}.json").read_text("utf-8")
    )
    data = json.loads(text)
    return Preset(
        name=name,
        models=tuple(data.get("models", [])),
        layers=tuple(data["layers"]),
        target=data.get("target", {}),
        **{section: data.get(section, {}) for section in METHOD_SECTIONS},
        sphere=data.get("sphere", {}),
        stats_tokens=int(data.get("stats_tokens", 100_000)),
        notes=data.get("notes", ""),
    )


def available_presets() -> list[str]:
    folder = resources.files("sphere_edit.editing.presets")
    names = (p.name for p in folder.iterdir())
    return sorted(n.removesuffix(".json") for n in names if n.endswith(".json"))


def preset_for(model_name: str, num_layers: int) -> Preset:
    """The preset whose ``models`` list holds ``model_name`` exactly, else a generic one."""
    for name in available_presets():
        preset = _read(name)
        if model_name in preset.models or model_name == name:
            return preset
    return generic_preset(num_layers)


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
