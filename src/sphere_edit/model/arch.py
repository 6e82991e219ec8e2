"""One table per architecture family: where the editable parts of a model live.

Everything that differs between model families is written down here, keyed by
``config.model_type``. No other module looks at model names or class names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

WeightLayout = Literal["out_in", "in_out"]


@dataclass(frozen=True)
class ArchSpec:
    """Module paths (dotted, relative to the model) of one architecture family.

    ``layer_mlp_out`` and ``post_mlp_norm`` are relative to a decoder layer.
    ``weight_layout`` says how the edited projection stores its weight: ``"out_in"`` like
    ``nn.Linear`` (rows are output units) or ``"in_out"`` like GPT-2's ``Conv1D``.
    ``post_mlp_norm`` names a normalisation between the MLP output and the residual
    stream (Gemma's post-feedforward RMSNorm), or ``None`` when the MLP output is added
    to the residual stream directly.
    ``layer_mlp_gate`` and ``layer_mlp_up`` name the MLP's input projections (the gate and
    up projections of a gated MLP; ``None`` for no gate, and a plain MLP's one input
    projection is its ``up``), stored in the same ``weight_layout``; methods that edit
    them (UltraEdit) address them as the modules ``"gate"`` and ``"up"``.
    """

    layers: str
    layer_mlp_out: str
    weight_layout: WeightLayout
    final_norm: str
    unembed: str
    post_mlp_norm: str | None = None
    layer_mlp_gate: str | None = None
    layer_mlp_up: str | None = None


_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    layer_mlp_out="mlp.down_proj",
    weight_layout="out_in",
    final_norm="model.norm",
    unembed="lm_head",
    layer_mlp_gate="mlp.gate_proj",
    layer_mlp_up="mlp.up_proj",
)
_GEMMA3_TEXT = ArchSpec(
    layers="model.layers",
    layer_mlp_out="mlp.down_proj",
    weight_layout="out_in",
    final_norm="model.norm",
    unembed="lm_head",
    post_mlp_norm="post_feedforward_layernorm",
    layer_mlp_gate="mlp.gate_proj",
    layer_mlp_up="mlp.up_proj",
)
# model_type "gemma3" is the multimodal checkpoint: AutoModelForCausalLM builds
# Gemma3ForConditionalGeneration, whose text decoder sits under model.language_model.
_GEMMA3 = ArchSpec(
    layers="model.language_model.layers",
    layer_mlp_out="mlp.down_proj",
    weight_layout="out_in",
    final_norm="model.language_model.norm",
    unembed="lm_head",
    post_mlp_norm="post_feedforward_layernorm",
    layer_mlp_gate="mlp.gate_proj",
    layer_mlp_up="mlp.up_proj",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        layers="transformer.h",
        layer_mlp_out="mlp.c_proj",
        weight_layout="in_out",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        layer_mlp_up="mlp.c_fc",
    ),
    "gptj": ArchSpec(
        layers="transformer.h",
        layer_mlp_out="mlp.fc_out",
        weight_layout="out_in",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        layer_mlp_up="mlp.fc_in",
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma3": _GEMMA3,
    "gemma3_text": _GEMMA3_TEXT,
}


class UnsupportedArchitectureError(ValueError):
    """The model's family has no entry in :data:`ARCHITECTURES`."""


def register_architecture(model_type: str, spec: ArchSpec, *, overwrite: bool = False) -> None:
    """Add a family to the table, e.g. ``register_architecture("phi3", ArchSpec(...))``."""
    if model_type in ARCHITECTURES and not overwrite:
        raise ValueError(
            f"architecture {model_type!r} is already registered; pass overwrite=True to replace it"
        )
    ARCHITECTURES[model_type] = spec


def arch_spec_for(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported (supported: {supported}). "
            "Register its module paths with sphere_edit.model.arch.register_architecture("
            f"{model_type!r}, ArchSpec(layers=..., layer_mlp_out=..., weight_layout=..., "
            "final_norm=..., unembed=...))."
        )
    return ARCHITECTURES[model_type]


def get_module(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for part in dotted.split("."):
        if not hasattr(module, part):
            raise AttributeError(
                f"{type(root).__name__} has no module {dotted!r} (missing {part!r}); "
                "the architecture table entry for this model_type is wrong"
            )
        module = getattr(module, part)
    return module


@dataclass(frozen=True)
class ModelLayout:
    """An :class:`ArchSpec` resolved against one model instance."""

    model: nn.Module
    spec: ArchSpec

    @classmethod
    def of(cls, model: nn.Module) -> ModelLayout:
        return cls(model=model, spec=arch_spec_for(model))

    @property
    def num_layers(self) -> int:
        return len(get_module(self.model, self.spec.layers))

    def layer(self, index: int) -> nn.Module:
        layers = get_module(self.model, self.spec.layers)
        if not 0 <= index < len(layers):
            raise IndexError(
                f"layer {index} is out of range: the model has layers 0..{len(layers) - 1}"
            )
        return layers[index]

    def layer_name(self, index: int) -> str:
        return f"{self.spec.layers}.{index}"

    def mlp_out(self, index: int) -> nn.Module:
        return get_module(self.layer(index), self.spec.layer_mlp_out)

    def mlp_out_weight_name(self, index: int) -> str:
        return f"{self.layer_name(index)}.{self.spec.layer_mlp_out}.weight"

    def module_path(self, name: str) -> str:
        """The path (relative to a decoder layer) of the edited module ``name``:
        ``"mlp_out"``, ``"gate"`` or ``"up"``; a module the family lacks is a one-line
        ValueError."""
        path = {
            "mlp_out": self.spec.layer_mlp_out,
            "gate": self.spec.layer_mlp_gate,
            "up": self.spec.layer_mlp_up,
        }.get(name)
        if path is None:
            model_type = getattr(self.model.config, "model_type", None)
            raise ValueError(
                f"modules: {model_type!r} models have no {name!r} module to edit; "
                "edit 'mlp_out', or 'up' (and 'gate' where the MLP is gated)"
            )
        return path

    def module(self, index: int, name: str) -> nn.Module:
        """The edited module ``name`` (see :meth:`module_path`) of layer ``index``."""
        return get_module(self.layer(index), self.module_path(name))

    def module_weight_name(self, index: int, name: str) -> str:
        return f"{self.layer_name(index)}.{self.module_path(name)}.weight"

    def read_module_weight(self, index: int, name: str) -> torch.Tensor:
        """The weight of module ``name`` of layer ``index`` in (out, in) layout."""
        weight = self.module(index, name).weight
        return weight.T if self.spec.weight_layout == "in_out" else weight

    def post_mlp_norm(self, index: int) -> nn.Module | None:
        if self.spec.post_mlp_norm is None:
            return None
        return get_module(self.layer(index), self.spec.post_mlp_norm)

    def final_norm(self) -> nn.Module:
        return get_module(self.model, self.spec.final_norm)

    def unembed(self) -> nn.Module:
        return get_module(self.model, self.spec.unembed)

    # The edit math works in nn.Linear layout (out, in): keys are columns' space.
    def read_weight(self, index: int) -> torch.Tensor:
        """The edited weight in (out, in) layout, as a view where possible."""
        weight = self.mlp_out(index).weight
        return weight.T if self.spec.weight_layout == "in_out" else weight

    def to_storage_layout(self, delta_out_in: torch.Tensor) -> torch.Tensor:
        return delta_out_in.T if self.spec.weight_layout == "in_out" else delta_out_in

    def key_dim(self, index: int) -> int:
        return self.read_weight(index).shape[1]

    def value_dim(self, index: int) -> int:
        return self.read_weight(index).shape[0]
