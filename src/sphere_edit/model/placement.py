"""Where a model's tensors live: one place for the device facts of a model whose modules
may sit on different devices (``--device-map``, see :mod:`.device_map`).

Under a device map accelerate's ``AlignDevicesHook`` moves a block's inputs to the block's
device and the model's outputs (the logits) back to the device of its inputs, but nothing
else: tensors a forward hook captures stay on the device of the module that made them, and
tensors written into a module must be on that module's device. The code that builds inputs,
reads captures or adds to an output asks here. On a model on one device every function is
the identity (``Tensor.to`` of a tensor already there returns it), so the one-device path
computes exactly what it did before device maps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .arch import ModelLayout

META = torch.device("meta")


def _hook_device(module: nn.Module) -> torch.device | None:
    """The execution device of accelerate's hook on ``module``, if it has one (a single
    hook or a ``SequentialHook`` of several)."""
    hook = getattr(module, "_hf_hook", None)
    for one in [hook, *getattr(hook, "hooks", ())]:
        device = getattr(one, "execution_device", None)
        if device is not None:
            # accelerate names a GPU by its index.
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return None


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device, else the device
    of its first parameter (or buffer); an offloaded module's weights are on ``meta`` and
    stream in to the execution device."""
    hooked = _hook_device(module)
    if hooked is not None:
        return hooked
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    raise ValueError(f"{type(module).__name__} has no parameters to tell its device")


def input_device(model: nn.Module) -> torch.device:
    """Where a forward's inputs go: the device of the token embedding, the first module
    to read them. The model's logits come back there too (accelerate's hook on the whole
    model returns its outputs to the device of its inputs). A model without one (not a
    Hugging Face model) takes its inputs where its first parameter is."""
    find = getattr(model, "get_input_embeddings", None)
    embedding = find() if find is not None else None
    return module_device(embedding if embedding is not None else model)


def index_on(values: torch.Tensor, *indices: torch.Tensor) -> torch.Tensor:
    """``values[indices]`` with the index tensors moved to ``values``' device first: the
    positions are built next to the inputs, a capture lives on its module's device."""
    return values[tuple(index.to(values.device) for index in indices)]


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate keeps ``module``'s weights off its device (on ``meta``, streamed
    in for each forward from the CPU or the disk); such weights cannot be edited in place."""
    return any(p.device == META for p in module.parameters(recurse=False))


def require_resident(layout: ModelLayout, layers: Iterable[int], modules: Sequence[str]) -> None:
    """Refuse, in one line naming the first, an edited module whose weights a device map
    offloads: its edits would go into a placeholder, not into the weights the model runs."""
    for layer in layers:
        for name in modules:
            if is_offloaded(layout.module(layer, name)):
                path = f"{layout.layer_name(layer)}.{layout.module_path(name)}"
                raise ValueError(
                    f"--device-map: layer {layer}'s {name} module ({path}) is offloaded, and "
                    "an edited module must be resident; map it to a GPU (or give no map)"
                )
