"""``--device-map``: a model spread over several devices, through accelerate.

A map is ``"auto"`` (accelerate fills the GPUs in order, then the CPU), ``"balanced"``
(the same share of the model on every GPU), a JSON file of ``module name -> device`` or,
from Python, such a dict. A file's map is checked against the model's modules (built on
the ``meta`` device from its config, no weights read) before any weights load; the chosen
map is applied with ``accelerate.dispatch_model``, which puts each mapped module on its
device and installs ``AlignDevicesHook`` on it (:mod:`.placement` says where a dispatched
model's tensors are). The map is explicit from then on: ``"auto"`` is resolved to the
dict it stands for, which the loaded model records.

``"disk"`` is refused: a disk-offloaded module's weights are read from a file for every
forward, and the edited weights must be resident. A ``"cpu"`` entry next to a GPU is
accelerate's CPU offload (weights on ``meta``, streamed to the GPU); that is allowed for
the modules no method edits, and :func:`~.placement.require_resident` refuses it for the
edited ones.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

DeviceMapSpec = str | Mapping[str, str | int] | None
DeviceMap = dict[str, str | int]  # module name -> "cpu" or a GPU index, accelerate's form

KINDS = ("auto", "balanced")
_HINT = "give auto, balanced or a JSON file of module -> device"


def _refuse(problem: str, fix: str = _HINT) -> ValueError:
    return ValueError(f"--device-map: {problem}; {fix}")


def read_device_map(spec: DeviceMapSpec) -> str | DeviceMap | None:
    """``spec`` as ``None``, ``"auto"``, ``"balanced"`` or a dict whose devices this
    machine has (GPUs as indices, ``"cpu"``); a file is read as JSON. The module names are
    checked against a model by :func:`check_device_map`."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return _devices(dict(spec), "the map")
    text = str(spec).strip()
    if text.lower() in KINDS:
        return text.lower()
    path = Path(text).expanduser()
    if not path.is_file():
        raise _refuse(f"{text!r} is neither auto, balanced nor a file")
    try:
        given = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        where = f" (line {error.lineno})" if isinstance(error, json.JSONDecodeError) else ""
        raise _refuse(
            f"{path} is not valid JSON{where}", "write one object of module -> device"
        ) from None
    if not isinstance(given, dict) or not given:
        raise _refuse(
            f"{path} holds no object of module -> device",
            'write e.g. {"model.embed_tokens": 0, "model.layers": 0, "lm_head": 1}',
        )
    return _devices(given, str(path))


def _devices(given: dict, source: str) -> DeviceMap:
    return {str(name): _device(name, value, source) for name, value in given.items()}


def _device(name: object, value: object, source: str) -> str | int:
    """One map entry's device in accelerate's form: ``"cpu"`` or a GPU index."""
    field = f"{source}[{str(name)!r}]"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _refuse(f"{field} is {value!r}, not a device", "give cpu, cuda:N or a GPU index N")
    text = value.strip().lower() if isinstance(value, str) else value
    if text == "disk":
        raise _refuse(
            f"{field} is disk, and the edited weights must be resident",
            "map every module to a GPU or the cpu",
        )
    if text == "cpu":
        return "cpu"
    if isinstance(text, str):
        if text == "cuda":
            text = "cuda:0"
        head, _, index = text.partition(":")
        if head != "cuda" or not index.isdigit():
            raise _refuse(
                f"{field} is {value!r}, not a device", "give cpu, cuda:N or a GPU index N"
            )
        text = int(index)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not 0 <= text < count:
        have = f"GPUs 0 to {count - 1}" if count else "no GPU"
        raise _refuse(
            f"{field} is GPU {text}, but this machine has {have}", "give cpu or a GPU it has"
        )
    return text


def check_device_map(device_map: DeviceMap, model: nn.Module) -> None:
    """Every name must be a module of ``model`` (``""`` is the whole model), and every
    parameter and buffer must fall under one of them."""
    modules = {name for name, _ in model.named_modules()}
    for name in device_map:
        if name not in modules:
            near = sorted(
                m for m in modules if m and m.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]
            )
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise _refuse(
                f"{name!r} is not a module of this model{hint}",
                "use the names of model.named_modules(), e.g. model.layers.0",
            )
    if "" in device_map:
        return
    for tensor in model.state_dict():
        if not any(tensor.startswith(f"{name}.") for name in device_map):
            raise _refuse(
                f"the map places no module holding {tensor}",
                "map it or a module above it (e.g. its layer)",
            )


def infer_device_map(kind: str, model: nn.Module, dtype: torch.dtype) -> DeviceMap:
    """The map ``"auto"`` or ``"balanced"`` stands for on this machine (accelerate's
    ``infer_auto_device_map``; ``model`` may be on ``meta``), never splitting a decoder
    layer; a model too large for the GPUs and the memory is refused, not put on disk."""
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if kind == "balanced":
        memory = get_balanced_memory(model, no_split_module_classes=no_split, dtype=dtype)
    else:
        memory = get_max_memory()
    inferred = infer_auto_device_map(
        model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype
    )
    on_disk = [name for name, device in inferred.items() if device == "disk"]
    if on_disk:
        raise _refuse(
            f"{kind} would put {on_disk[0]} on disk (the model does not fit this machine's "
            "GPUs and memory), and the edited weights must be resident",
            "use a machine with more memory, or load the model in a smaller dtype",
        )
    return {name: ("cpu" if device == "cpu" else int(device)) for name, device in inferred.items()}


def main_device(device_map: DeviceMap, model: nn.Module) -> str | int:
    """Where the model's inputs go and every CPU-offloaded module runs: the embedding's
    GPU, else the first GPU the map names, else the CPU (accelerate's default picks one
    from a set, in no fixed order)."""
    embedding = _owner(device_map, _name_of(model, model.get_input_embeddings()))
    if embedding is not None and device_map[embedding] != "cpu":
        return device_map[embedding]
    return next((d for d in device_map.values() if d != "cpu"), "cpu")


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _owner(device_map: DeviceMap, module_name: str) -> str | None:
    """The entry of ``device_map`` that places ``module_name`` (the longest prefix)."""
    owners = [
        n for n in device_map if n == "" or module_name == n or module_name.startswith(f"{n}.")
    ]
    return max(owners, key=len) if owners else None


def dispatch(model: nn.Module, device_map: DeviceMap) -> None:
    """Put ``model``'s modules where ``device_map`` says, with accelerate's hooks on them.
    The hooks are installed even when the map names one device (``force_hooks``): every
    map runs the same way, and a map on the CPU exercises what a multi-GPU map does."""
    from accelerate import dispatch_model

    main = main_device(device_map, model)
    quiet = _NotOffloaded() if main == "cpu" else None
    log = logging.getLogger("accelerate.big_modeling")
    if quiet is not None:
        log.addFilter(quiet)
    try:
        dispatch_model(
            model,
            device_map=device_map,
            main_device=main,
            # The key/value cache stays where each layer keeps it (what transformers passes).
            skip_keys=getattr(model, "_skip_keys_device_placement", None),
            force_hooks=True,
        )
    finally:
        if quiet is not None:
            log.removeFilter(quiet)


class _NotOffloaded(logging.Filter):
    """accelerate warns of parameters "offloaded to the cpu" for every "cpu" entry, but
    with the CPU as the main device nothing is offloaded (only "disk" would be, and that
    is refused): drop that one warning then."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "offloaded to the cpu" not in record.getMessage()


def describe_device_map(device_map: DeviceMap) -> str:
    """``"12 modules: cuda:0 ×7, cuda:1 ×5"``: what a run header shows of a map."""
    counts: dict[str, int] = {}
    for device in device_map.values():
        label = "cpu" if device == "cpu" else f"cuda:{device}"
        counts[label] = counts.get(label, 0) + 1
    parts = ", ".join(f"{label} ×{n}" for label, n in counts.items())
    return f"{len(device_map)} module{'s' if len(device_map) != 1 else ''}: {parts}"
