"""Per-model defaults (edited layers, target optimisation, method options), stored as JSON
files in ``sphere_edit/editing/presets/``. A preset lists the model names it is for and
the architecture identity of the model (:func:`model_identity`), which also matches a
local folder holding the same model; a model with no preset gets a generic one derived
from its depth. Every other section is a registered method's options."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from ...methods import get_method, method_names

# The entries of a preset file that are not method sections.
GENERAL_KEYS = (
    "models", "identity", "layers", "target", "sphere", "stats_tokens", "notes", "measurements",
    "stats_pieces", "template_tokens",
)  # fmt: skip
# The entries of a method section that are not method options: a one-layer method's
# ``layer``, a band method's ``layers``.
LAYER_KEYS = ("layer", "layers")
# The entries of a preset's ``sphere`` section, each with its valid range (low, high,
# whether low is excluded).
SPHERE_KEYS = {"eta": (0.0, 1.0, True), "alpha_alphaedit": (0.0, 1.0, False),
               "alpha_other": (0.0, 1.0, False)}  # fmt: skip
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
    # For a preset read from a file: its path, the SHA-256 of its bytes, and (EasyEdit
    # YAML) one line per field saying where it went.
    path: str = ""
    sha256: str = ""
    mapping: tuple[str, ...] = ()

    def header(self) -> dict[str, Any]:
        """What a session's journal header records of the preset: its name, and for a
        file its path and SHA-256 (so that a resume with another file is refused)."""
        if not self.path:
            return {"preset": self.name}
        return {"preset": self.name, "preset_file": self.path, "preset_sha256": self.sha256}

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
        return {k: v for k, v in options.items() if k not in LAYER_KEYS}

    def band(self, method: str) -> tuple[int, ...] | None:
        """The layers a method with a band of its own (UltraEdit) edits: its section's
        ``layers``; None where the section has none (the method then scales its band to
        the depth)."""
        layers = self.section(method).get("layers")
        return None if layers is None else tuple(int(x) for x in layers)

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
            section = {k: v for k, v in data[key].items() if k not in LAYER_KEYS}
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


# -- presets from files ---------------------------------------------------------------------


def _kind_ok(value: Any, kind: type) -> bool:
    """Whether a JSON value has the type of a setting whose default is of ``kind``; bool
    never counts as a number, an int counts as a float."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _type_name(kind: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(kind, kind.__name__)  # fmt: skip


def _target_kinds() -> dict[str, tuple[type, bool]]:
    """Each v* setting's type and whether it may be null, from VStarConfig's defaults."""
    from ..vstar import VStarConfig

    kinds: dict[str, tuple[type, bool]] = {}
    for f in dataclasses.fields(VStarConfig):
        default = f.default
        nullable = default is None or f.name == "positions_per_pass"
        kinds[f.name] = (int if default is None else type(default), nullable)
    return kinds


def check_preset_data(where: str, data: Any) -> None:
    """Every field of a preset file's contents: a one-line :class:`PresetError` naming
    ``where`` (the file) and the key path of the first bad field, with the fix."""
    if not isinstance(data, Mapping):
        raise PresetError(f"{where}: the file must hold one JSON object, got {type(data).__name__}")
    known = method_names()
    for key in data:
        if key not in GENERAL_KEYS and key not in known:
            raise PresetError(
                f"{where}: {key}: no such entry and no known method; methods: "
                f"{', '.join(known)}; other entries: {', '.join(GENERAL_KEYS)}"
            )
    if "layers" not in data:
        raise PresetError(f"{where}: layers: missing; give the edited layers, e.g. [3, 4, 5]")
    layers = data["layers"]
    if not _is_layer_list(layers):
        raise PresetError(
            f"{where}: layers: must be a non-empty list of layer numbers >= 0, got {layers!r}"
        )
    general: dict[str, type] = {"models": list, "identity": dict, "target": dict,
                                "sphere": dict, "stats_tokens": int, "notes": str}  # fmt: skip
    for key, kind in general.items():
        if key in data and not _kind_ok(data[key], kind):
            raise PresetError(f"{where}: {key}: must be {_type_name(kind)}, got {data[key]!r}")
    if not all(isinstance(m, str) for m in data.get("models", [])):
        raise PresetError(f"{where}: models: must be a list of model names (strings)")
    if "stats_tokens" in data and data["stats_tokens"] < 1000:
        raise PresetError(
            f"{where}: stats_tokens: must be at least 1000, got {data['stats_tokens']}"
        )
    kinds = _target_kinds()
    for key, value in data.get("target", {}).items():
        if key not in kinds:
            raise PresetError(
                f"{where}: target.{key}: no such v* setting; valid: {', '.join(kinds)}"
            )
        kind, nullable = kinds[key]
        if not (value is None and nullable) and not _kind_ok(value, kind):
            raise PresetError(f"{where}: target.{key}: must be {_type_name(kind)}, got {value!r}")
    from ..vstar import VStarConfig

    try:
        VStarConfig(**data.get("target", {}))
    except ValueError as error:
        raise PresetError(f"{where}: target: {error}") from None
    for key, value in data.get("sphere", {}).items():
        if key not in SPHERE_KEYS:
            raise PresetError(
                f"{where}: sphere.{key}: no such entry; valid: {', '.join(SPHERE_KEYS)}"
            )
        low, high, low_open = SPHERE_KEYS[key]
        ok = (
            _kind_ok(value, float) and (value > low if low_open else value >= low) and value <= high
        )
        if not ok:
            left = "(" if low_open else "["
            raise PresetError(
                f"{where}: sphere.{key}: must be a number in {left}{low:g}, {high:g}], "
                f"got {value!r}"
            )
    for method in (key for key in data if key in known):
        _check_section(where, method, data[method])


def _is_layer_list(value: Any) -> bool:
    """A non-empty list of layer numbers >= 0 (the preset's window, a band's layers)."""
    return (
        isinstance(value, list) and bool(value) and all(_kind_ok(x, int) and x >= 0 for x in value)
    )


def _check_section(where: str, method: str, section: Any) -> None:
    info = get_method(method)
    if not isinstance(section, Mapping):
        raise PresetError(f"{where}: {method}: must be an object of {method}'s options")
    declared = {option.name: option for option in info.options}
    for key, value in section.items():
        if key == "layer":
            if not info.single_layer:
                raise PresetError(
                    f"{where}: {method}.layer: only a one-layer method takes 'layer'; "
                    f"{method} edits the preset's layers"
                )
            if not (_kind_ok(value, int) and value >= 0):
                raise PresetError(
                    f"{where}: {method}.layer: must be a layer number >= 0, got {value!r}"
                )
            continue
        if key == "layers":
            if not info.own_band:
                raise PresetError(
                    f"{where}: {method}.layers: only a method with a band of its own "
                    f"(ultraedit) takes 'layers'; {method} edits the preset's layers"
                )
            if not _is_layer_list(value):
                raise PresetError(
                    f"{where}: {method}.layers: must be a non-empty list of layer numbers "
                    f">= 0, got {value!r}"
                )
            continue
        if key not in declared:
            valid = ", ".join(declared) or "none"
            raise PresetError(
                f"{where}: {method}.{key}: {method} has no such option; valid: {valid}"
            )
        try:
            declared[key].check(method, value)
        except ValueError:
            raise PresetError(
                f"{where}: {method}.{key}: must be {declared[key].range_text()}, got {value!r}"
            ) from None


def check_preset_layers(preset: Preset, num_layers: int) -> None:
    """The preset's layers (and its one-layer methods' ``layer``, its band methods'
    ``layers``) must exist in a model of ``num_layers`` layers; a one-line
    :class:`PresetError` naming the field if not."""
    where = preset.path or f"preset {preset.name}"
    fields: list[tuple[str, Iterable[int]]] = [("layers", preset.layers)]
    for method, section in preset.methods.items():
        if section.get("layer") is not None:
            fields.append((f"{method}.layer", [section["layer"]]))
        fields.append((f"{method}.layers", section.get("layers") or ()))
    for name, layers in fields:
        for layer in layers:
            if not 0 <= layer < num_layers:
                raise PresetError(
                    f"{where}: {name}: layer {layer} is out of range; the model has layers "
                    f"0..{num_layers - 1}"
                )


def load_preset_file(path: str | Path) -> Preset:
    """A preset from a JSON file in the shipped presets' format, or from an EasyEdit
    hparams YAML (``.yaml``/``.yml``, see :mod:`.easyedit`); every field is checked, and
    a bad one is a one-line :class:`PresetError` naming the file and the key path. The
    layers are checked against a model by :func:`check_preset_layers`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise PresetError(f"--preset: cannot read {path}: {error.strerror or error}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if path.suffix.lower() in (".yaml", ".yml"):
        from .easyedit import preset_from_hparams

        preset = preset_from_hparams(path, raw.decode("utf-8", errors="replace"))
        return replace(preset, path=str(path), sha256=digest)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PresetError(
            f"{path}: not JSON ({error}); write it like the shipped presets"
        ) from None
    check_preset_data(str(path), data)
    return replace(parse_preset(path.stem, data), path=str(path), sha256=digest)


def preset_to_data(preset: Preset) -> dict[str, Any]:
    """The contents of a preset file for ``preset`` (what :func:`load_preset_file` reads)."""
    data: dict[str, Any] = {"models": list(preset.models)}
    if preset.identity:
        data["identity"] = dict(preset.identity)
    data["layers"] = list(preset.layers)
    data["target"] = dict(preset.target)
    data.update({method: dict(section) for method, section in preset.methods.items()})
    if preset.sphere:
        data["sphere"] = dict(preset.sphere)
    data["stats_tokens"] = preset.stats_tokens
    if preset.notes:
        data["notes"] = preset.notes
    return data
