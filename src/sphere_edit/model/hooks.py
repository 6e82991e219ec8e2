"""Small context managers around forward hooks (in the spirit of baukit's nethook)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised from a hook to end a forward pass early (everything needed is captured)."""


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, tensor: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    return tensor


class Capture:
    """Holds what a hook saw on the last forward pass."""

    def __init__(self) -> None:
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.raw_output: Any = None  # the output as the module returned it


@contextmanager
def capture(module: nn.Module, *, stop: bool = False) -> Iterator[Capture]:
    """Record the first positional input and the output of ``module``.

    With ``stop=True`` the forward pass is ended right after the module runs; wrap the
    call in :func:`run_until_stopped`.
    """
    seen = Capture()

    def hook(_module: nn.Module, args: tuple, output: Any) -> None:
        seen.input = args[0] if args else None
        seen.output = _first(output)
        seen.raw_output = output
        if stop:
            raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def edit_output(module: nn.Module, edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the (first) output tensor of ``module`` by ``edit(output)``."""

    def hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
        return _replace_first(output, edit(_first(output)))

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def edit_input(module: nn.Module, edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the first positional input of ``module`` by ``edit(input)``."""

    def hook(_module: nn.Module, args: tuple) -> tuple:
        return (edit(args[0]), *args[1:])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _Skipped(nn.Module):
    """Stands in for a skipped decoder layer: returns its input (``hidden is None``) or
    ``hidden``, in the structure of ``output``, and computes nothing."""

    def __init__(self, output: Any, hidden: torch.Tensor | None) -> None:
        super().__init__()
        self.output, self.hidden = output, hidden

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        given = args[0] if args else kwargs["hidden_states"]
        return _replace_first(self.output, given if self.hidden is None else self.hidden)


@contextmanager
def skipped_layers(
    container: nn.ModuleList, count: int, output: Any, hidden: torch.Tensor
) -> Iterator[None]:
    """Skip the computation of the first ``count`` decoder layers (entries of
    ``container``, the model's decoder-layer list): each passes its input through, and the
    last returns ``hidden`` in the structure of ``output`` (a real output of that layer,
    tensor or tuple). For when everything up to the last of them is known in advance.

    A hook cannot keep a module from computing: pre-hooks only rewrite the inputs and
    forward hooks run after ``forward``. Nor may ``forward`` be replaced on the layer:
    accelerate's device-map hooks already replace it (``add_hook_to_module``), and putting
    it back afterwards would destroy their wrapper. So the layers themselves stay
    untouched and, for the duration, the container holds stand-ins at their positions;
    the model's own loop still calls every position with its own arguments (per-layer
    masks, cache), and the layers after the skipped ones run as usual. The skipped layers
    are not called, so their own hooks do not run: a caller that wants a changed
    ``hidden`` passes the changed tensor.
    """
    if not 1 <= count <= len(container):
        raise ValueError(f"skipped_layers: count must be in 1..{len(container)}, got {count}")
    layers = [container[i] for i in range(count)]
    for i in range(count - 1):
        container[i] = _Skipped(output, None)
    container[count - 1] = _Skipped(output, hidden)
    try:
        yield
    finally:
        for i, layer in enumerate(layers):
            container[i] = layer


def run_until_stopped(fn: Callable[[], Any]) -> None:
    """Call ``fn`` and swallow the :class:`StopForward` a capture hook raises."""
    try:
        fn()
    except StopForward:
        pass


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Turn off gradients of every parameter (restoring the flags afterwards)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def linear_weights_as(
    model: nn.Module, dtype: torch.dtype, within: Sequence[nn.Module] | None = None
) -> Iterator[None]:
    """For the duration, every float32 ``nn.Linear`` weight and bias of ``model`` (only
    those under the modules ``within``, when given) holds a ``dtype`` copy; the original
    storage is put back afterwards, so the weights come back bitwise.

    Under bfloat16 autocast a linear casts its float32 weight on every call: autocast
    caches casts only of parameters that require gradients, and the v* loop freezes them
    all, so each pass recasts every weight. A weight already in bfloat16 is used as it is,
    and the cast autocast does is this same rounding, so the outputs are bitwise the same
    while the casting is done once. A weight an ``nn.Embedding`` shares (a tied
    unembedding) is left alone: the embeddings would come out in ``dtype``, and with them
    the rotary tables Hugging Face models build in the embeddings' dtype.
    """
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    originals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    roots = [model] if within is None else list(within)
    for module in (m for root in roots for m in root.modules()):
        if not isinstance(module, nn.Linear):
            continue
        for tensor in (module.weight, module.bias):
            if tensor is None or tensor.dtype != torch.float32:
                continue
            if id(tensor) in originals or id(tensor) in embedded:
                continue
            originals[id(tensor)] = (tensor, tensor.data)
            tensor.data = tensor.data.to(dtype)
    try:
        yield
    finally:
        for tensor, data in originals.values():
            tensor.data = data


@contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Run the model with the Hugging Face attention implementation ``name`` ("eager",
    "sdpa", ...) for the duration, and put the previous one back afterwards."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)
    if previous is None or previous == name or setter is None:
        yield
        return
    setter(name)
    try:
        yield
    finally:
        setter(previous)
