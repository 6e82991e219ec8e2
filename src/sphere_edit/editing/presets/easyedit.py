"""EasyEdit hparams YAML as a preset.

EasyEdit (``hparams/<METHOD>/<model>.yaml``) describes one method on one model. For the
methods both projects have (ROME, MEMIT, AlphaEdit, FT) each field is either mapped to
ours (:data:`TARGET_FIELDS`, :data:`OPTION_FIELDS`, ``layers``), accepted when it names the
only behaviour we have (:data:`ACCEPTED_VALUES`), ignored with a note when it only names
what we derive ourselves (module paths from the architecture table, devices:
:data:`IGNORED_FIELDS`), or refused by name. docs/design.md lists every decision.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import Preset, PresetError, check_preset_data, parse_preset

# EasyEdit's alg_name -> our method.
METHODS = {"ROME": "rome", "MEMIT": "memit", "ALPHAEDIT": "alphaedit", "FT": "ft"}

# v* optimisation (EasyEdit's compute_z / compute_v) -> VStarConfig.
TARGET_FIELDS = {
    "v_num_grad_steps": "steps",
    "v_lr": "lr",
    "v_weight_decay": "weight_decay",
    "clamp_norm_factor": "clamp_factor",
    "kl_factor": "kl_factor",
}
# Per method: EasyEdit field -> our method option.
OPTION_FIELDS: dict[str, dict[str, str]] = {
    "memit": {"mom2_update_weight": "mom2_weight"},
    "alphaedit": {"nullspace_threshold": "nullspace_threshold", "L2": "l2"},
    "ft": {"lr": "lr", "norm_constraint": "epsilon", "num_steps": "steps"},
    "rome": {},
}
# Fields with one value we implement; any other value is refused.
ACCEPTED_VALUES: dict[str, Any] = {
    "fact_token": "subject_last",
    "layer_selection": "all",
    "mom2_adjustment": True,
    "mom2_dtype": "float32",
    "objective_optimization": "target_new",
}
# FT fields whose only supported value is zero (our FT has no such term).
FT_ZERO_FIELDS = ("weight_decay", "kl_factor")
# Fields that name what we take from the architecture table or the command line.
IGNORED_FIELDS = {
    "rewrite_module_tmp": "module paths come from the architecture table",
    "layer_module_tmp": "module paths come from the architecture table",
    "mlp_module_tmp": "module paths come from the architecture table",
    "attn_module_tmp": "module paths come from the architecture table",
    "ln_f_module": "module paths come from the architecture table",
    "lm_head_module": "module paths come from the architecture table",
    "stats_dir": "statistics are cached by model and corpus fingerprint",
    "device": "give --device",
    "model_parallel": "give --device-map",
    "batch_size": "give --batch-size",
    "max_length": "prompts are not truncated",
    "v_loss_layer": "the v* loss is read at the model's output (EasyEdit: the last layer)",
    "mom2_dataset": "the corpus is --corpus (default: text sampled from the model)",
    "mom2_n_samples": "EasyEdit counts records, we count tokens: give --stats-tokens",
    "context_template_length_params": "context templates are sphere-edit's own",
}


def _refuse(where: str, key: str, reason: str) -> PresetError:
    return PresetError(f"{where}: {key}: {reason}")


def preset_from_hparams(path: str | Path, text: str) -> Preset:
    """The preset an EasyEdit hparams YAML describes; ``mapping`` holds one line per
    field (``ours ← theirs``, or why it is ignored). A field or value we do not
    implement is a one-line :class:`PresetError` naming it."""
    import yaml

    where = str(path)
    try:
        hparams = yaml.safe_load(text)
    except yaml.YAMLError as error:
        first = str(error).splitlines()[0] if str(error) else "invalid YAML"
        raise PresetError(f"{where}: not YAML ({first})") from None
    if not isinstance(hparams, Mapping):
        raise PresetError(f"{where}: an EasyEdit hparams file must hold one mapping of fields")
    alg = hparams.get("alg_name")
    if not isinstance(alg, str) or alg.upper() not in METHODS:
        raise _refuse(
            where, "alg_name", f"{alg!r} is not a method we share; give one of "
            f"{', '.join(sorted(METHODS))}"
        )  # fmt: skip
    method = METHODS[alg.upper()]
    data: dict[str, Any] = {"target": {}, method: {}}
    lines = [f"method {method} ← alg_name {alg}"]
    for key, value in hparams.items():
        line = _map_field(where, method, key, value, data)
        if line:
            lines.append(line)
    if "layers" not in data:
        raise _refuse(where, "layers", "missing; EasyEdit hparams name the edited layers")
    data["notes"] = f"from EasyEdit hparams {Path(path).name}"
    check_preset_data(where, data)
    preset = parse_preset(f"easyedit:{Path(path).name}", data)
    return replace(preset, mapping=tuple(lines))


def _number(value: Any) -> Any:
    """PyYAML follows YAML 1.1, which reads ``1e-1`` (no dot) as a string; EasyEdit's
    files write numbers that way."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _map_field(where: str, method: str, key: str, value: Any, data: dict[str, Any]) -> str:
    """Put one EasyEdit field into ``data``; the line saying where it went."""
    value = _number(value) if key not in ("alg_name", "model_name") else value
    if key == "alg_name":
        return ""
    if key == "model_name":
        data["models"] = [str(value)]
        return f"models ← model_name {value}"
    if key == "layers":
        return _map_layers(where, method, value, data)
    if key in ACCEPTED_VALUES:
        if value != ACCEPTED_VALUES[key]:
            raise _refuse(
                where, key, f"{value!r} is not implemented; only {ACCEPTED_VALUES[key]!r} is"
            )
        return f"(accepted) {key} {value}: the only behaviour sphere-edit has"
    if method == "ft" and key in FT_ZERO_FIELDS:
        if value not in (0, 0.0):
            raise _refuse(where, key, f"{value!r} is not implemented for FT; only 0 is")
        return f"(accepted) {key} {value}: FT has no such term"
    if key in OPTION_FIELDS[method]:
        ours = OPTION_FIELDS[method][key]
        data[method][ours] = value
        return f"{method}.{ours} ← {key} {value}"
    if key in TARGET_FIELDS and method != "ft":
        data["target"][TARGET_FIELDS[key]] = value
        return f"target.{TARGET_FIELDS[key]} ← {key} {value}"
    if key == "mom2_update_weight" and method in ("alphaedit", "rome"):
        return f"(ignored) {key} {value}: {method}'s solve has no C0 weight"
    if key in IGNORED_FIELDS:
        return f"(ignored) {key} {value}: {IGNORED_FIELDS[key]}"
    raise _refuse(
        where, key, f"an EasyEdit field sphere-edit does not implement for {method}; remove it"
    )


def _map_layers(where: str, method: str, value: Any, data: dict[str, Any]) -> str:
    if not isinstance(value, list) or not value:
        raise _refuse(where, "layers", f"must be a non-empty list of layer numbers, got {value!r}")
    data["layers"] = value
    if method in ("rome", "ft"):
        if len(value) != 1:
            raise _refuse(
                where, "layers", f"{method} edits one layer in sphere-edit, got {value!r}"
            )
        data[method]["layer"] = value[0]
        return f"layers, {method}.layer ← layers {value}"
    return f"layers ← layers {value}"
