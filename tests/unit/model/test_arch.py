"""The architecture table and ModelLayout, on tiny models of every family."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sphere_edit.model.arch import (
    ARCHITECTURES,
    ArchSpec,
    ModelLayout,
    UnsupportedArchitectureError,
    arch_spec_for,
    register_architecture,
)
from tests.tiny_models import TINY_INTERMEDIATE, TINY_LAYERS, TINY_MODEL_TYPES
from tests.unit._helpers import mlp_out_module


@pytest.fixture
def restore_table():
    saved = dict(ARCHITECTURES)
    yield
    ARCHITECTURES.clear()
    ARCHITECTURES.update(saved)


class _ToyBlock(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.ff = nn.Module()
        self.ff.out = nn.Linear(d_in, d_out)
        self.norm2 = nn.LayerNorm(d_out)


class _ToyModel(nn.Module):
    """A model of a family the table does not know, with its own module names."""

    def __init__(self, model_type: str = "toy_family") -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type=model_type)
        self.trunk = nn.Module()
        self.trunk.blocks = nn.ModuleList([_ToyBlock(12, 5) for _ in range(3)])
        self.trunk.final = nn.LayerNorm(5)
        self.head = nn.Linear(5, 7)


_TOY_SPEC = ArchSpec(
    layers="trunk.blocks",
    layer_mlp_out="ff.out",
    weight_layout="out_in",
    final_norm="trunk.final",
    unembed="head",
    post_mlp_norm="norm2",
)


def test_every_tiny_family_is_in_the_table():
    for model_type in TINY_MODEL_TYPES:
        assert model_type in ARCHITECTURES


def test_unsupported_model_type_lists_families_and_register_hint():
    with pytest.raises(UnsupportedArchitectureError) as info:
        arch_spec_for(_ToyModel("toy_family"))
    message = str(info.value)
    assert "'toy_family'" in message
    for model_type in ARCHITECTURES:
        assert model_type in message
    assert "register_architecture" in message
    # It is a ValueError too, so generic handlers catch it.
    assert isinstance(info.value, ValueError)


def test_unsupported_error_hint_names_a_callable_that_exists():
    """The message tells the user which function to call; that function must exist."""
    with pytest.raises(UnsupportedArchitectureError) as info:
        ModelLayout.of(_ToyModel("toy_family"))
    message = str(info.value)
    dotted = message.split("Register its module paths with ")[1].split("(")[0]
    module_name, _, function_name = dotted.rpartition(".")
    module = __import__(module_name, fromlist=[function_name])
    assert getattr(module, function_name) is register_architecture


def test_model_without_config_is_unsupported():
    with pytest.raises(UnsupportedArchitectureError, match="None"):
        arch_spec_for(nn.Linear(2, 2))


def test_register_architecture_makes_a_new_family_work(restore_table):
    model = _ToyModel()
    register_architecture("toy_family", _TOY_SPEC)
    layout = ModelLayout.of(model)
    assert layout.num_layers == 3
    assert layout.mlp_out(1) is model.trunk.blocks[1].ff.out
    assert layout.post_mlp_norm(2) is model.trunk.blocks[2].norm2
    assert layout.final_norm() is model.trunk.final
    assert layout.unembed() is model.head
    assert layout.mlp_out_weight_name(1) == "trunk.blocks.1.ff.out.weight"
    assert layout.mlp_out_weight_name(1) in dict(model.named_parameters())
    assert layout.key_dim(0) == 12
    assert layout.value_dim(0) == 5


def test_register_architecture_refuses_to_overwrite(restore_table):
    register_architecture("toy_family", _TOY_SPEC)
    other = ArchSpec(
        layers="x", layer_mlp_out="y", weight_layout="in_out", final_norm="z", unembed="w"
    )
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("toy_family", other)
    assert ARCHITECTURES["toy_family"] is _TOY_SPEC
    with pytest.raises(ValueError, match="overwrite=True"):
        register_architecture("llama", other)
    assert ARCHITECTURES["llama"] is not other
    register_architecture("toy_family", other, overwrite=True)
    assert ARCHITECTURES["toy_family"] is other


def test_wrong_table_entry_names_the_missing_module(restore_table):
    broken = ArchSpec(
        layers="trunk.blocks",
        layer_mlp_out="ff.missing",
        weight_layout="out_in",
        final_norm="trunk.final",
        unembed="head",
    )
    register_architecture("toy_family", broken)
    layout = ModelLayout.of(_ToyModel())
    with pytest.raises(AttributeError, match="'missing'"):
        layout.mlp_out(0)


def test_layer_index_out_of_range():
    layout = ModelLayout(model=_ToyModel(), spec=_TOY_SPEC)
    with pytest.raises(IndexError, match=r"0\.\.2"):
        layout.layer(3)
    with pytest.raises(IndexError):
        layout.layer(-1)


def test_layout_resolves_every_family(tiny_model):
    model, _ = tiny_model
    layout = ModelLayout.of(model)
    assert layout.num_layers == TINY_LAYERS
    for layer in range(TINY_LAYERS):
        assert layout.mlp_out(layer) is mlp_out_module(model, layer)
    names = dict(model.named_parameters())
    assert names[layout.mlp_out_weight_name(2)] is mlp_out_module(model, 2).weight
    hidden = model.config.get_text_config().hidden_size
    assert layout.final_norm()(torch.randn(2, hidden)).shape == (2, hidden)
    assert layout.unembed().weight.shape[0] == model.config.vocab_size
    has_post_norm = model.config.model_type == "gemma3_text"
    assert (layout.post_mlp_norm(1) is not None) == has_post_norm


def test_read_weight_is_out_in_for_every_family(tiny_model):
    """read_weight is W with mlp_out(x) = x Wᵀ + b, whatever the storage layout."""
    model, _ = tiny_model
    layout = ModelLayout.of(model)
    module = layout.mlp_out(1)
    hidden = model.config.get_text_config().hidden_size
    weight = layout.read_weight(1)
    assert weight.shape == (hidden, TINY_INTERMEDIATE)
    assert layout.key_dim(1) == TINY_INTERMEDIATE
    assert layout.value_dim(1) == hidden
    if model.config.model_type == "gpt2":
        # Conv1D stores (in, out).
        assert module.weight.shape == (TINY_INTERMEDIATE, hidden)
    x = torch.randn(3, TINY_INTERMEDIATE)
    with torch.no_grad():
        bias = module(torch.zeros(1, TINY_INTERMEDIATE))
        expected = module(x) - bias
    torch.testing.assert_close(x @ weight.T, expected, atol=1e-5, rtol=1e-5)


def test_to_storage_layout_adds_the_intended_update(tiny_model):
    """Adding to_storage_layout(ΔW) to the stored weight changes the output by x ΔWᵀ."""
    model, _ = tiny_model
    layout = ModelLayout.of(model)
    module = layout.mlp_out(2)
    hidden = model.config.get_text_config().hidden_size
    delta = torch.randn(hidden, TINY_INTERMEDIATE)
    x = torch.randn(4, TINY_INTERMEDIATE)
    with torch.no_grad():
        before = module(x)
        module.weight.add_(layout.to_storage_layout(delta))
        after = module(x)
    torch.testing.assert_close(after - before, x @ delta.T, atol=1e-4, rtol=1e-4)


def test_read_weight_is_a_view(tiny_model):
    model, _ = tiny_model
    layout = ModelLayout.of(model)
    view = layout.read_weight(0)
    with torch.no_grad():
        layout.mlp_out(0).weight.mul_(2.0)
    assert torch.equal(view, layout.read_weight(0))


def test_multimodal_gemma3_layout(tiny_tokenizer):
    """model_type "gemma3" (Gemma3ForConditionalGeneration): the text decoder's modules."""
    from transformers import AutoModelForCausalLM, Gemma3Config

    from sphere_edit.editing.keys import read_layer
    from sphere_edit.editing.requests import EditRequest

    text = {
        "vocab_size": len(tiny_tokenizer),
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
    }
    vision = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 28,
        "patch_size": 14,
    }
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    config.text_config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    assert model.config.model_type == "gemma3"
    layout = ModelLayout.of(model)
    assert layout.num_layers == 2
    modules = dict(model.named_modules())
    assert layout.mlp_out(1) is modules["model.language_model.layers.1.mlp.down_proj"]
    assert layout.final_norm() is modules["model.language_model.norm"]
    assert layout.post_mlp_norm(0) is not None
    assert layout.unembed().weight.shape[0] == len(tiny_tokenizer)
    request = EditRequest.create("{} is located in", "Toronto", "France")
    readout = read_layer(model, tiny_tokenizer, layout, 0, 1, [request], ["{}"])
    assert readout.keys.shape == (1, 48)
