"""Keys (inputs of the edited projection) and current outputs at the subject's last token."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..model.arch import ModelLayout, get_module
from ..model.hooks import capture, run_until_stopped, skipped_layers
from ..model.placement import index_on, input_device, module_device
from .requests import EditRequest
from .text import SubjectPrompt, encode_subject_prompts


def template_weights(n_templates: int) -> torch.Tensor:
    """MEMIT's averaging: the bare prompt and the mean of the prefixed ones count equally."""
    if n_templates == 1:
        return torch.ones(1)
    rest = torch.full((n_templates - 1,), 0.5 / (n_templates - 1))
    return torch.cat([torch.tensor([0.5]), rest])


# Whether read_layer runs under bf16 autocast when its caller does not say: set for a
# block of code by key_precision (the session sets it for a batch, from VStarConfig.bf16).
_BF16: ContextVar[bool] = ContextVar("sphere_edit_keys_bf16", default=False)


@contextmanager
def key_precision(bf16: bool) -> Iterator[None]:
    """Run the :func:`read_layer` passes inside the block under bfloat16 autocast (or
    not), unless a call says otherwise; the readouts are float32 either way."""
    token = _BF16.set(bf16)
    try:
        yield
    finally:
        _BF16.reset(token)


@dataclass
class LayerReadout:
    keys: torch.Tensor  # (n_requests, key_dim), template-averaged, float32
    mlp_out: torch.Tensor  # (n_requests, value_dim) MLP output on the bare prompt
    z_out: torch.Tensor  # (n_requests, hidden) output of layer ``z_layer`` on the bare prompt


@dataclass
class LowerLayers:
    """The outputs of the decoder layers below ``first`` for every chunk of prompts, kept
    by the first :func:`read_layer` call and replayed by the next ones. Valid while no
    layer below ``first`` changes, e.g. over MEMIT's schedule on layers ``first`` and up,
    which reads every layer on the same prompts: each read then runs only the edited
    window (layers 7 to 11 of 12 on SmolLM2)."""

    first: int
    outputs: list[tuple[Any, torch.Tensor]] = field(default_factory=list)


@torch.no_grad()
def read_layer(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layout: ModelLayout,
    layer: int,
    z_layer: int,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    *,
    rows_per_pass: int = 128,
    lower: LowerLayers | None = None,
    bf16: bool | None = None,
) -> LayerReadout:
    """One pass over every (request, template) prompt, stopped after ``max(layer, z_layer)``.

    Template 0 must be the bare prompt ``"{}"``; the MLP output and layer output are read
    there, the keys are averaged over all templates; the readouts are on the device of
    the model's inputs, where the v* are. With ``lower``, the layers below
    ``lower.first`` run on the first call only (same requests and templates every call).
    ``bf16`` runs the passes under bfloat16 autocast (default: as :func:`key_precision`
    says, else float32).
    """
    if templates[0] != "{}":
        raise ValueError("the first context template must be the bare prompt '{}'")
    device = input_device(model)
    bf16 = _BF16.get() if bf16 is None else bf16
    prompts = [SubjectPrompt.build(r, context=c) for r in requests for c in templates]
    n_t = len(templates)
    keys, mlp_outs, z_outs = [], [], []
    stop_module = layout.layer(max(layer, z_layer))
    first = lower.first if lower is not None else 0
    below = [layout.layer(i) for i in range(first)]
    if min(layer, z_layer) < first:
        raise ValueError(f"read_layer: layer {min(layer, z_layer)} is below the replayed layers")
    for chunk, begin in enumerate(range(0, len(prompts), rows_per_pass)):
        batch = encode_subject_prompts(tokenizer, prompts[begin : begin + rows_per_pass], device)
        rows = torch.arange(len(batch), device=device)
        with ExitStack() as stack:
            mlp = stack.enter_context(capture(layout.mlp_out(layer)))
            z = stack.enter_context(capture(layout.layer(z_layer)))
            stack.enter_context(capture(stop_module, stop=True))
            stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16))
            kept = None
            if lower is not None and below:
                if chunk < len(lower.outputs):
                    container = get_module(model, layout.spec.layers)
                    stack.enter_context(
                        skipped_layers(container, len(below), *lower.outputs[chunk])
                    )
                else:
                    kept = stack.enter_context(capture(below[-1]))
            run_until_stopped(lambda batch=batch: model(**batch.model_inputs()))
        if lower is not None and kept is not None:
            lower.outputs.append((kept.raw_output, kept.output))
        # Each capture is on its module's device (under a device map, not the inputs').
        keys.append(index_on(mlp.input, rows, batch.lookup).float().to(device))
        mlp_outs.append(index_on(mlp.output, rows, batch.lookup).float().to(device))
        z_outs.append(index_on(z.output, rows, batch.lookup).float().to(device))
    all_keys = torch.cat(keys).view(len(requests), n_t, -1)
    weights = template_weights(n_t).to(all_keys)
    return LayerReadout(
        keys=torch.einsum("rtd,t->rd", all_keys, weights),
        mlp_out=torch.cat(mlp_outs).view(len(requests), n_t, -1)[:, 0],
        z_out=torch.cat(z_outs).view(len(requests), n_t, -1)[:, 0],
    )


def residual_to_mlp_delta(
    layout: ModelLayout, layer: int, mlp_out: torch.Tensor, residual_delta: torch.Tensor
) -> torch.Tensor:
    """The change of the MLP output that moves the residual stream by ``residual_delta``.

    Without a post-MLP norm this is the identity. With an RMSNorm ``y = g ⊙ m / rms(m)``
    between them (Gemma), the norm's output can only turn, not grow: every reachable
    output is ``g ⊙ u`` with ``rms(u) = 1``. So the MLP is asked for the reachable output
    closest to ``t = y + r``: minimise ``‖g ⊙ u − t‖`` subject to ``rms(u) = 1``, whose
    solution is ``u = g ⊙ t / (g² + μ)`` with the scalar μ set by the constraint (see
    :func:`_closest_unit_rms`). The new MLP output is ``u`` at the current scale of ``m``.
    Channels with zero gain do not reach the residual stream and keep their value.

    Dividing by the gain instead (``m' ∝ t / g``) blows up every channel with a small
    gain; the norm then shrinks the whole output, which erased the layer's contribution
    and broke Gemma edits.
    """
    norm = layout.post_mlp_norm(layer)
    if norm is None:
        return residual_delta
    with torch.no_grad():
        # The norm is called directly, outside its layer's forward: its inputs must be on
        # its device (a device map may put the layer elsewhere than the readouts).
        where = module_device(norm)
        m = mlp_out.to(where).double()
        dtype = next(norm.parameters()).dtype
        ones = torch.ones(1, m.shape[-1], dtype=dtype, device=where)
        gain = norm(ones).double().expand_as(m)
        y = norm(mlp_out.to(where, dtype)).double()
        scale = m.pow(2).mean(-1, keepdim=True).sqrt()
        unit = _closest_unit_rms(gain, y + residual_delta.to(where).double(), m / scale)
        # (m / scale) * scale need not round back to m: zero-gain channels get an exact 0.
        delta = torch.where(gain == 0, 0.0, unit * scale - m)
        return delta.to(residual_delta.device, residual_delta.dtype)


def _closest_unit_rms(
    gain: torch.Tensor, target: torch.Tensor, current: torch.Tensor, iterations: int = 200
) -> torch.Tensor:
    """Per row, ``argmin ‖gain ⊙ u − target‖`` subject to ``mean(u²) = 1``, where
    channels with ``gain == 0`` keep their ``current`` value.

    Stationarity gives ``u = g t / (g² + μ)``; ``mean(u²)`` falls monotonically in μ on
    ``μ > −min g²`` (the branch of the global minimum), so μ is found by bisection.
    """
    free = gain != 0
    fixed = torch.where(free, torch.zeros_like(current), current)
    budget = gain.shape[-1] - fixed.pow(2).sum(-1)  # Σu² left for the free channels
    g2 = torch.where(free, gain.pow(2), torch.full_like(gain, torch.inf))
    gt = torch.where(free, gain * target, torch.zeros_like(target))

    def spent(mu: torch.Tensor) -> torch.Tensor:
        return (gt / (g2 + mu.unsqueeze(-1))).pow(2).sum(-1)

    low = -g2.min(-1).values
    low = low + 1e-12 * low.abs().clamp(min=1.0)
    high = torch.ones_like(low)
    while bool((spent(high) > budget).any()):
        high = torch.where(spent(high) > budget, high * 4, high)
    for _ in range(iterations):
        mid = (low + high) / 2
        too_much = spent(mid) > budget
        low, high = torch.where(too_much, mid, low), torch.where(too_much, high, mid)
    mu = ((low + high) / 2).unsqueeze(-1)
    return torch.where(free, gt / (g2 + mu), fixed)
