"""Keys (inputs of the edited projection) and current outputs at the subject's last token."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .arch import ModelLayout
from .hooks import capture, run_until_stopped
from .requests import EditRequest
from .text import SubjectPrompt, encode_subject_prompts


def template_weights(n_templates: int) -> torch.Tensor:
    """MEMIT's averaging: the bare prompt and the mean of the prefixed ones count equally."""
    if n_templates == 1:
        return torch.ones(1)
    rest = torch.full((n_templates - 1,), 0.5 / (n_templates - 1))
    return torch.cat([torch.tensor([0.5]), rest])


@dataclass
class LayerReadout:
    keys: torch.Tensor  # (n_requests, key_dim), template-averaged, float32
    mlp_out: torch.Tensor  # (n_requests, value_dim) MLP output on the bare prompt
    z_out: torch.Tensor  # (n_requests, hidden) output of layer ``z_layer`` on the bare prompt


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
) -> LayerReadout:
    """One pass over every (request, template) prompt, stopped after ``max(layer, z_layer)``.

    Template 0 must be the bare prompt ``"{}"``; the MLP output and layer output are read
    there, the keys are averaged over all templates.
    """
    if templates[0] != "{}":
        raise ValueError("the first context template must be the bare prompt '{}'")
    device = next(model.parameters()).device
    prompts = [SubjectPrompt.build(r, context=c) for r in requests for c in templates]
    n_t = len(templates)
    keys, mlp_outs, z_outs = [], [], []
    stop_module = layout.layer(max(layer, z_layer))
    for begin in range(0, len(prompts), rows_per_pass):
        batch = encode_subject_prompts(tokenizer, prompts[begin : begin + rows_per_pass], device)
        rows = torch.arange(len(batch), device=device)
        with ExitStack() as stack:
            mlp = stack.enter_context(capture(layout.mlp_out(layer)))
            z = stack.enter_context(capture(layout.layer(z_layer)))
            stack.enter_context(capture(stop_module, stop=True))
            run_until_stopped(lambda batch=batch: model(**batch.model_inputs()))
        keys.append(mlp.input[rows, batch.lookup].float())
        mlp_outs.append(mlp.output[rows, batch.lookup].float())
        z_outs.append(z.output[rows, batch.lookup].float())
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

    Without a post-MLP norm this is the identity. With an RMSNorm ``y = g * m / rms(m)``
    between them (Gemma), the norm is inverted at the current scale of ``m``:
    ``m' = (y + r) / g * rms(m)``, exact to first order in ``r``.
    """
    norm = layout.post_mlp_norm(layer)
    if norm is None:
        return residual_delta
    with torch.no_grad():
        mlp_out = mlp_out.float()
        ones = torch.ones(1, mlp_out.shape[-1], dtype=mlp_out.dtype, device=mlp_out.device)
        gain = norm(ones.to(next(norm.parameters()).dtype)).float()
        scale = mlp_out.pow(2).mean(-1, keepdim=True).sqrt()
        wanted = norm(mlp_out.to(next(norm.parameters()).dtype)).float() + residual_delta
        # A channel the norm scales to (almost) zero cannot be moved: leave it as it is
        # rather than divide by zero.
        movable = gain.abs() > 1e-6
        safe_gain = torch.where(movable, gain, torch.ones_like(gain))
        return torch.where(movable, wanted / safe_gain * scale - mlp_out, 0.0)
