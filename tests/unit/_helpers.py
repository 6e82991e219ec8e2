"""Shared helpers for the unit tests, written independently of ``sphere_edit``'s own code."""

from __future__ import annotations

import torch
from torch import nn

from sphere_edit.editing.requests import EditRequest
from sphere_edit.model.loading import LoadedModel

# Where each family keeps its MLP output projection, spelled out here (not read from
# ``sphere_edit.model.arch``) so that tests compare against an independent source.
MLP_OUT_PATH = {
    "gpt2": ("transformer.h", "mlp.c_proj"),
    "gptj": ("transformer.h", "mlp.fc_out"),
    "llama": ("model.layers", "mlp.down_proj"),
    "mistral": ("model.layers", "mlp.down_proj"),
    "qwen2": ("model.layers", "mlp.down_proj"),
    "gemma3_text": ("model.layers", "mlp.down_proj"),
}


def module_at(root: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def decoder_layer(model: nn.Module, layer: int) -> nn.Module:
    layers_path, _ = MLP_OUT_PATH[model.config.model_type]
    return module_at(model, layers_path)[layer]


def mlp_out_module(model: nn.Module, layer: int) -> nn.Module:
    _, mlp_path = MLP_OUT_PATH[model.config.model_type]
    return module_at(decoder_layer(model, layer), mlp_path)


def requests_abc() -> list[EditRequest]:
    """Three requests of different lengths (words of the tiny tokenizer's corpus)."""
    return [
        EditRequest.create("{} is located in", "Toronto", "France"),
        EditRequest.create("The mother tongue of {} is", "Marie Curie", "English"),
        EditRequest.create("{} plays the", "Glenn Gould", "guitar"),
    ]


def subject_last_index_by_decoding(tokenizer, ids: list[int], subject_end: int) -> int:
    """The first token whose decoded prefix reaches character ``subject_end``."""
    for i in range(len(ids)):
        if len(tokenizer.decode(ids[: i + 1])) >= subject_end:
            return i
    raise AssertionError("the subject end is beyond the decoded text")


@torch.no_grad()
def run_single(model: nn.Module, ids: list[int], layer: int, z_layer: int):
    """Run one unpadded prompt; return the MLP output module's input and output, and the
    output of decoder layer ``z_layer``, each (seq, dim)."""
    seen: dict[str, torch.Tensor] = {}

    def on_mlp(_m, args, output):
        seen["key"] = args[0][0].detach().clone()
        seen["mlp"] = (output[0] if isinstance(output, tuple) else output)[0].detach().clone()

    def on_layer(_m, _args, output):
        seen["z"] = (output[0] if isinstance(output, tuple) else output)[0].detach().clone()

    handles = [
        mlp_out_module(model, layer).register_forward_hook(on_mlp),
        decoder_layer(model, z_layer).register_forward_hook(on_layer),
    ]
    try:
        model(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return seen["key"], seen["mlp"], seen["z"]


def subject_end_in(context: str, request: EditRequest) -> int:
    """Character end of the subject in ``context`` filled with the request's prompt (the
    subject may occur earlier in the context too)."""
    return (
        len(context.partition("{}")[0])
        + len(request.prompt.partition("{}")[0])
        + len(request.subject)
    )


def tiny_loaded(tokenizer, family: str = "llama", seed: int = 0) -> LoadedModel:
    """A tiny random model of ``family`` as ``load_model`` would return it."""
    from tests.tiny_models import make_tiny_model

    model = make_tiny_model(family, tokenizer, seed=seed)
    return LoadedModel(model=model, tokenizer=tokenizer, name=f"tiny-{family}")


def weights_copy(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}


def assert_weights_equal(loaded: LoadedModel, expected: dict[str, torch.Tensor]) -> None:
    """Bitwise: every tensor of the model equals ``expected``'s."""
    state = loaded.model.state_dict()
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


# Batches of 2, 1 and 2 requests of different lengths (words of the tiny tokenizer's corpus).
THREE_BATCHES = [
    [
        EditRequest.create("{} is located in", "Toronto", "France"),
        EditRequest.create("{} plays the", "Glenn Gould", "guitar"),
    ],
    [EditRequest.create("The mother tongue of {} is", "Marie Curie", "English")],
    [
        EditRequest.create("{} plays", "Lionel Messi", "hockey"),
        EditRequest.create("{} is a city in", "Lyon", "Italy"),
    ],
]


def saved_memit_session(directory, tokenizer, family: str, layers: list[int]):
    """A tiny ``family`` model saved to ``directory/tiny-<family>`` (so that a command can
    load it by the name its journal records) and loaded back, with a MEMIT session that
    journals into ``directory/run``. Returns (model folder, loaded model, session)."""
    from sphere_edit.editing.session import EditSession
    from sphere_edit.editing.stats import collect_second_moments, load_corpus
    from sphere_edit.editing.vstar import VStarConfig
    from sphere_edit.methods import MEMIT
    from sphere_edit.model.loading import load_model
    from tests.tiny_models import TRAINING_SENTENCES, make_tiny_model

    folder = directory / f"tiny-{family}"
    make_tiny_model(family, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded = load_model(str(folder))
    corpus_file = directory / "corpus.txt"
    corpus_file.write_text("\n\n".join(TRAINING_SENTENCES), encoding="utf-8")
    moments = collect_second_moments(
        loaded.model, loaded.tokenizer, layers, load_corpus(str(corpus_file)),
        max_tokens=1000, progress=False,
    )  # fmt: skip
    session = EditSession(
        loaded, MEMIT(mom2_weight=1.0), layers, {k: m.moment for k, m in moments.items()},
        target=VStarConfig(steps=3), run_dir=directory / "run", templates=["{}"],
    )  # fmt: skip
    return folder, loaded, session
