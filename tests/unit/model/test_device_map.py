"""``--device-map``: a tiny model dispatched by accelerate with a hook on every decoder
layer (every module on the CPU, the one device here, as a multi-GPU map places them) edits
exactly as the undispatched model; rollback is bitwise; bad maps are refused in one line
before the weights load; an offloaded edited module is refused, an offloaded other one
is not."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import dispatch_model
from accelerate.hooks import AlignDevicesHook

from sphere_edit.editing.session import EditSession
from sphere_edit.editing.stats import collect_second_moments, load_corpus
from sphere_edit.editing.vstar import VStarConfig, compute_vstar
from sphere_edit.methods import make_method
from sphere_edit.model import loading
from sphere_edit.model.loading import LoadedModel, load_model, place
from sphere_edit.model.placement import input_device, is_offloaded, module_device
from sphere_edit.sphere.projection import SphereProjection
from tests.tiny_models import TRAINING_SENTENCES, make_tiny_model
from tests.unit._helpers import (
    THREE_BATCHES,
    assert_weights_equal,
    decoder_layer,
    mlp_out_module,
    module_at,
    requests_abc,
    tiny_loaded,
    weights_copy,
)

LAYERS = [1, 2]
TARGET = VStarConfig(steps=3)
TEMPLATES = ["{}", "The day. {}"]
# The decoder-layer list of each family, written out here (not read from sphere_edit).
LAYER_LISTS = {"llama": "model.layers", "gpt2": "transformer.h", "gemma3_text": "model.layers"}
FAMILIES = list(LAYER_LISTS)


def _block_map(model: torch.nn.Module, device: str = "cpu") -> dict[str, str]:
    """Each decoder layer and each other module beside them an entry of its own, so that
    ``dispatch_model`` hooks every one of them, as a map over several GPUs does."""
    layers = LAYER_LISTS[model.config.model_type]
    parent, _, own = layers.rpartition(".")
    beside = [f"{parent}.{name}" for name, _ in module_at(model, parent).named_children()]
    top = [name for name, _ in model.named_children() if name != parent]
    count = len(module_at(model, layers))
    names = [n for n in beside if n != layers] + [f"{layers}.{i}" for i in range(count)]
    return dict.fromkeys([*names, *top], device)


def _pair(tokenizer, family: str = "llama") -> tuple[LoadedModel, LoadedModel]:
    """The same tiny model twice: as loaded, and dispatched over :func:`_block_map`."""
    plain = tiny_loaded(tokenizer, family)
    mapped = tiny_loaded(tokenizer, family)
    return plain, place(mapped, _block_map(mapped.model))


def _moments(loaded: LoadedModel, tmp_path, layers=LAYERS) -> dict[int, torch.Tensor]:
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("\n\n".join(TRAINING_SENTENCES), encoding="utf-8")
    moments = collect_second_moments(
        loaded.model, loaded.tokenizer, layers, load_corpus(str(corpus_file)),
        max_tokens=1000, progress=False,
    )  # fmt: skip
    return {layer: m.moment for layer, m in moments.items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_the_map_hooks_every_block_and_is_recorded(tiny_tokenizer):
    plain, mapped = _pair(tiny_tokenizer)
    for layer in range(mapped.layout.num_layers):
        assert isinstance(decoder_layer(mapped.model, layer)._hf_hook, AlignDevicesHook)
    assert mapped.device_map == _block_map(mapped.model)
    assert mapped.fingerprint == plain.fingerprint  # where it runs is not what it computes
    assert input_device(mapped.model) == torch.device("cpu")
    assert module_device(mlp_out_module(mapped.model, 1)) == torch.device("cpu")


def test_the_statistics_pass_gives_the_same_moments(tiny_tokenizer, tmp_path):
    plain, mapped = _pair(tiny_tokenizer)
    ours, theirs = _moments(plain, tmp_path), _moments(mapped, tmp_path)
    _assert_same({str(k): v for k, v in ours.items()}, {str(k): v for k, v in theirs.items()})


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("method", "layers", "sphere"),
    [("memit", LAYERS, False), ("alphaedit", LAYERS, True), ("rome", [1], False)],
)
def test_a_batch_gives_the_same_deltas_under_the_map(
    tiny_tokenizer, tmp_path, family, method, layers, sphere
):
    deltas, keys = [], []
    for loaded in _pair(tiny_tokenizer, family):
        session = EditSession(
            loaded, make_method(method), layers, _moments(loaded, tmp_path, layers),
            transform=SphereProjection() if sphere else None,
            target=TARGET, templates=TEMPLATES,
        )  # fmt: skip
        session.apply(THREE_BATCHES[0])
        deltas.append(session.batches[-1].deltas)
        keys.append({str(k): v for k, v in session.batches[-1].keys.items()})
    _assert_same(*deltas)
    _assert_same(*keys)


@pytest.mark.parametrize("family", FAMILIES)
def test_ultraedit_with_sphere_gives_the_same_deltas_under_the_map(tiny_tokenizer, family):
    deltas, states = [], []
    for loaded in _pair(tiny_tokenizer, family):
        method = make_method("ultraedit", lr=0.1)
        layers = method.default_layers(loaded.layout.num_layers)  # type: ignore[union-attr]
        session = EditSession(
            loaded, method, layers, {}, transform=SphereProjection(), templates=["{}"]
        )
        session.apply(THREE_BATCHES[0])
        deltas.append(session.batches[-1].deltas)
        states.append(session.batches[-1].method_state)
    _assert_same(*deltas)
    _assert_same(*states)


def test_ft_gives_the_same_delta_under_the_map(tiny_tokenizer):
    deltas = []
    for loaded in _pair(tiny_tokenizer):
        session = EditSession(
            loaded, make_method("ft", steps=3), [2], {2: torch.zeros(128, 128)}, templates=["{}"]
        )
        session.apply(THREE_BATCHES[1])
        deltas.append(session.batches[-1].deltas)
    _assert_same(*deltas)


def test_rollback_under_the_map_restores_the_weights_bitwise(tiny_tokenizer, tmp_path):
    _, mapped = _pair(tiny_tokenizer)
    session = EditSession(
        mapped, make_method("memit"), LAYERS, _moments(mapped, tmp_path),
        target=TARGET, templates=["{}"],
    )  # fmt: skip
    base = weights_copy(mapped)
    session.apply(THREE_BATCHES[0])
    after_one = weights_copy(mapped)
    session.apply(THREE_BATCHES[1])
    session.rollback(1)
    assert_weights_equal(mapped, after_one)
    session.rollback(1)
    assert_weights_equal(mapped, base)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("route", ["cached", "reference"])
def test_vstar_under_the_map_equals_vstar_without_it(tiny_tokenizer, family, route):
    """The cached route runs the layers up to v*'s through stand-ins (``skipped_layers``)
    in place of the hooked layers; both routes give what they give without the map."""
    config = VStarConfig(steps=4, route=route)
    results = [
        compute_vstar(
            loaded.model, loaded.tokenizer, loaded.layout, 2, requests_abc(), TEMPLATES, config
        )
        for loaded in _pair(tiny_tokenizer, family)
    ]
    assert torch.equal(results[0].vectors, results[1].vectors)
    assert torch.equal(results[0].init, results[1].init)


def test_cached_and_reference_routes_agree_under_the_map(tiny_tokenizer):
    _, mapped = _pair(tiny_tokenizer)
    cached, reference = (
        compute_vstar(
            mapped.model,
            mapped.tokenizer,
            mapped.layout,
            2,
            requests_abc(),
            TEMPLATES,
            VStarConfig(steps=4, route=route),
        )  # fmt: skip
        for route in ("cached", "reference")
    )
    torch.testing.assert_close(cached.init, reference.init, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached.vectors, reference.vectors, atol=1e-4, rtol=0)


# -- offloaded modules -----------------------------------------------------------------------


def _offloaded(tokenizer, tmp_path, layer: int) -> LoadedModel:
    """A tiny llama whose decoder layer ``layer`` accelerate offloads to disk (weights on
    ``meta``, read in for each forward): what ``--device-map`` refuses to build, made
    here with accelerate directly to see what the editing code does with it."""
    loaded = tiny_loaded(tokenizer)
    device_map = _block_map(loaded.model)
    device_map[f"model.layers.{layer}"] = "disk"
    dispatch_model(
        loaded.model, device_map=device_map, main_device="cpu",
        offload_dir=str(tmp_path / "offload"), force_hooks=True,
    )  # fmt: skip
    return loaded


def test_an_offloaded_edited_module_is_refused_naming_it(tiny_tokenizer, tmp_path):
    loaded = _offloaded(tiny_tokenizer, tmp_path, 1)
    assert is_offloaded(mlp_out_module(loaded.model, 1))
    moments = {1: torch.zeros(128, 128), 2: torch.zeros(128, 128)}
    with pytest.raises(ValueError) as caught:
        EditSession(loaded, make_method("memit"), LAYERS, moments, templates=["{}"])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("--device-map: layer 1's mlp_out module")
    assert "model.layers.1.mlp.down_proj" in message


def test_an_offloaded_module_that_is_not_edited_is_streamed_in(tiny_tokenizer, tmp_path):
    plain = tiny_loaded(tiny_tokenizer)
    offloaded = _offloaded(tiny_tokenizer, tmp_path, 0)
    deltas = []
    for loaded in (plain, offloaded):
        session = EditSession(
            loaded, make_method("memit"), LAYERS, _moments(loaded, tmp_path),
            target=TARGET, templates=["{}"],
        )  # fmt: skip
        session.apply(THREE_BATCHES[0])
        deltas.append(session.batches[-1].deltas)
    _assert_same(*deltas)


# -- refusals --------------------------------------------------------------------------------


@pytest.fixture
def tiny_folder(tmp_path, tiny_tokenizer):
    folder = tmp_path / "tiny-llama"
    model = make_tiny_model("llama", tiny_tokenizer)
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder, _block_map(model)


def _map_file(tmp_path, content) -> str:
    path = tmp_path / "map.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_a_map_file_loads_the_model_over_it(tiny_folder, tmp_path, tiny_tokenizer):
    folder, device_map = tiny_folder
    loaded = load_model(str(folder), device_map=_map_file(tmp_path, device_map))
    assert loaded.device_map == device_map
    assert isinstance(decoder_layer(loaded.model, 0)._hf_hook, AlignDevicesHook)
    assert loaded.fingerprint == load_model(str(folder)).fingerprint


def test_auto_on_a_machine_without_gpus_puts_the_model_on_the_cpu(tiny_folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    folder, _ = tiny_folder
    for kind in ("auto", "balanced"):
        loaded = load_model(str(folder), device_map=kind)
        assert loaded.device_map == {"": "cpu"}
        assert input_device(loaded.model) == torch.device("cpu")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model.layerz.0": "cpu"}, "--device-map: 'model.layerz.0' is not a module"),
        ({"model.layers.1": "disk"}, "is disk, and the edited weights must be resident"),
        ({"model.layers.1": "cuda:3"}, "is GPU 3, but this machine has no GPU"),
        ({"model.layers.1": "tpu"}, "is 'tpu', not a device; give cpu, cuda:N"),
        ({"model.layers.1": None}, "is None, not a device"),
    ],
)
def test_a_bad_map_file_is_refused_before_the_weights_load(
    tiny_folder, tmp_path, monkeypatch, change, message
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)

    def no_weights(*_args, **_kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", no_weights)
    folder, device_map = tiny_folder
    with pytest.raises(ValueError, match="^--device-map: ") as caught:
        load_model(str(folder), device_map=_map_file(tmp_path, {**device_map, **change}))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"model.layers.0": "cpu",', "is not valid JSON (line 1); write one object"),
        ("[]", "holds no object of module -> device"),
    ],
)
def test_a_map_file_that_is_not_a_json_object_is_refused(tiny_folder, tmp_path, content, message):
    folder, _ = tiny_folder
    with pytest.raises(ValueError, match="^--device-map: ") as caught:
        load_model(str(folder), device_map=_map_file(tmp_path, content))
    assert message in str(caught.value)


def test_a_map_that_leaves_a_module_out_is_refused(tiny_folder, tmp_path):
    folder, device_map = tiny_folder
    del device_map["lm_head"]
    with pytest.raises(ValueError, match="places no module holding lm_head.weight"):
        load_model(str(folder), device_map=_map_file(tmp_path, device_map))


def test_neither_a_kind_nor_a_file_is_refused(tiny_folder):
    folder, _ = tiny_folder
    with pytest.raises(ValueError, match="^--device-map: 'sequential' is neither auto"):
        load_model(str(folder), device_map="sequential")


def test_device_and_device_map_together_are_refused(tiny_folder):
    folder, _ = tiny_folder
    with pytest.raises(ValueError, match="--device and --device-map both"):
        load_model(str(folder), device="cpu", device_map="auto")
