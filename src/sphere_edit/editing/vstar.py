"""Target values v*: the residual at the last edited layer that makes the model say the new target.

For every request a vector delta is added to the output of layer ``z_layer`` at the
subject's last token and optimised with Adam so that the model emits ``target_new`` after
the prompt (in every context template), while the distribution after "{subject} is a"
stays close to the unedited one (MEMIT's ``compute_z``). All requests of a batch are
optimised together, each with its own vector: the losses are independent, so the summed
loss gives every vector exactly the gradient it would get alone, and Adam is elementwise.

Two forward routes give the same numbers:

- ``"reference"``: every step runs every prompt in full.
- ``"cached"`` (default): tokens before the subject's last token cannot depend on delta,
  so they are run once per batch and kept as a key/value cache; each step runs only the
  positions from the subject's last token on, and the unembedding only where the loss
  reads it.

This module holds the settings (:class:`VStarConfig`), the result, the grouping of
requests into passes and the optimiser (:func:`compute_vstar`); the routes and the rows
they run are :mod:`.vstar_passes`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..common.faults import fault_point
from ..model.arch import ModelLayout
from ..model.hooks import attention_implementation, frozen_parameters, linear_weights_as
from ..model.placement import input_device
from .requests import EditRequest
from .text import pad_id_of
from .vstar_passes import KL_TEMPLATE as KL_TEMPLATE  # re-exported: the "is a" prompt
from .vstar_passes import _build_rows, _ReferencePass, _SplitPass, _tail_length
from .vstar_passes import _CachedPass as _CachedPass  # re-exported for the tests

Route = Literal["cached", "reference"]
Optimizer = Literal["adam", "adam-warm", "adam-adapt"]
Attention = Literal["auto", "model", "eager"]
OPTIMIZERS = ("adam", "adam-warm", "adam-adapt")
ATTENTIONS = ("auto", "model", "eager")
# adam-warm: the first step's learning rate over ``lr``; it falls linearly to
# WARM_FLOOR · lr at the last step.
WARM_FACTOR = 2.0
WARM_FLOOR = 0.1


@dataclass(frozen=True)
class VStarConfig:
    """Settings of the v* optimisation (MEMIT's ``compute_z``), one set for every request.

    The loss of a request is ``nll + kl + decay``: the mean negative log-likelihood of
    ``target_new`` over the context templates, ``kl_factor`` times the KL divergence of the
    next-token distribution after "{subject} is a" from the unedited one, and
    ``weight_decay · ‖delta‖ / ‖init‖²``.

    - ``steps``: the most loss evaluations per request; Adam updates delta after each one
      but the last.
    - ``lr``: Adam's learning rate for delta.
    - ``kl_factor``: weight of the KL term, which keeps what the model says about the
      subject in general.
    - ``weight_decay``: weight of the norm penalty on delta (relative to the squared norm
      of the layer output it is added to).
    - ``clamp_factor``: after every update, ``‖delta‖`` is cut back to at most
      ``clamp_factor · ‖init‖``.
    - ``loss_tolerance``: a request whose loss falls below it stops; its vector is kept
      as it was when it got there.
    - ``bf16``: run the forward passes under bfloat16 autocast.
    - ``requests_per_pass``: the most requests optimised in one forward pass (a pass
      holds all their context rows).
    - ``positions_per_pass``: the most rewrite-row positions (context rows × the longest
      tail in the pass) in one pass, ``None`` for no cap; bounds the autograd graph, so
      the peak memory. A request over the cap gets a pass of its own.
    - ``route``: ``"cached"`` (the prefix before the subject's last token runs once) or
      ``"reference"`` (every step runs every prompt in full); both give the same numbers.
    - ``optimizer``: how delta moves. ``"adam"`` (default, MEMIT's schedule): Adam at a
      constant ``lr``. ``"adam-warm"``: Adam from ``WARM_FACTOR · lr`` falling linearly
      to ``WARM_FLOOR · lr`` over the steps. ``"adam-adapt"``: Adam at ``lr`` with a step
      size per request: halved after a step that raised the request's loss, grown by a
      quarter (up to 1) after one that lowered it. The variants are options for
      measurement (``benchmarks/vstar_steps.py``), not MEMIT's method.
    - ``attention``: the attention implementation of the optimisation steps. ``"model"``:
      the model's own (usually PyTorch's SDPA). ``"eager"``: Hugging Face's plain
      matmul-softmax attention, the same math with other rounding; under bf16 on a CPU
      its backward is much cheaper for the steps' few query positions, in float32 it is
      slower (``benchmarks/vstar_step_cost.py``). ``"auto"`` (default): eager under bf16 on
      a CPU, the model's own otherwise. How, not what: a journal resumes under any of them.
    """

    steps: int = 25
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_factor: float = 0.75
    loss_tolerance: float = 5e-2
    bf16: bool = False
    requests_per_pass: int = 16
    # Cap on (context rows × tail positions) per pass, None for none. The autograd graph
    # of a pass grows with it: with a cap, passes of long-tailed requests hold fewer of
    # them and the v* peak falls (docs/performance.md, benchmarks/vstar_memory.py).
    positions_per_pass: int | None = 256
    route: Route = "cached"
    optimizer: Optimizer = "adam"
    attention: Attention = "auto"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"target steps must be at least 1, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"target lr must be positive, got {self.lr}")
        if self.clamp_factor <= 0:
            raise ValueError(f"target clamp_factor must be positive, got {self.clamp_factor}")
        if self.requests_per_pass < 1:
            raise ValueError("target requests_per_pass must be at least 1")
        if self.positions_per_pass is not None and self.positions_per_pass < 1:
            raise ValueError("target positions_per_pass must be at least 1 (or None for no cap)")
        if self.route not in ("cached", "reference"):
            raise ValueError(f"target route must be 'cached' or 'reference', got {self.route!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"target optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.attention not in ATTENTIONS:
            raise ValueError(
                f"target attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}"
            )

    def eager_attention(self, device: torch.device) -> bool:
        """Whether the steps run with eager attention on ``device`` (``attention``
        resolved: auto is eager for bf16 on a CPU, where it was measured to pay; a GPU's
        fused attention kernels are left alone)."""
        if self.attention == "auto":
            return self.bf16 and device.type == "cpu"
        return self.attention == "eager"


@dataclass
class VStarResult:
    vectors: torch.Tensor  # (n, hidden): v* = init + delta
    init: torch.Tensor  # (n, hidden): layer output before the edit
    loss: torch.Tensor  # (n,) final total loss
    nll: torch.Tensor  # (n,) final mean target NLL
    steps: torch.Tensor  # (n,) optimisation steps each request took
    history: list[float] = field(default_factory=list)  # mean loss per step
    # (n,) loss of every request after each step (a converged request keeps its last).
    trace: list[torch.Tensor] = field(default_factory=list)


def warm_factor(step: int, steps: int) -> float:
    """adam-warm's learning rate over ``lr`` at the update after ``step`` (0-based):
    ``WARM_FACTOR`` at the first update, falling linearly to ``WARM_FLOOR`` at the last
    (the update after step ``steps - 2``; the last step only evaluates)."""
    share = step / max(steps - 2, 1)
    return WARM_FACTOR + (WARM_FLOOR - WARM_FACTOR) * share


def pass_groups(
    tails: Sequence[int], rows_per_request: int, config: VStarConfig
) -> list[list[int]]:
    """Request indices in passes, by ascending tail length: at most ``requests_per_pass``
    per pass and, with ``positions_per_pass``, at most that many rewrite-row positions
    (rows × the longest tail in the pass); a request too long for the cap gets a pass
    of its own."""
    order = sorted(range(len(tails)), key=lambda rid: tails[rid])
    groups: list[list[int]] = []
    for rid in order:
        group = groups[-1] if groups else []
        # Ascending order: the request joining a pass has its longest tail.
        positions = (len(group) + 1) * rows_per_request * tails[rid]
        cap = config.positions_per_pass
        if group and len(group) < config.requests_per_pass and (cap is None or positions <= cap):
            group.append(rid)
        else:
            groups.append([rid])
    return groups


def compute_vstar(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layout: ModelLayout,
    z_layer: int,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    config: VStarConfig = VStarConfig(),
    on_step: Callable[[int, int, int], None] | None = None,
) -> VStarResult:
    """The target value v* of each request at the output of decoder layer ``z_layer``.

    For every request a vector delta is added to that layer's output at the subject's
    last token and optimised with Adam (see :class:`VStarConfig` for the loss and the
    stopping rule) so that the model says ``target_new`` after the prompt in every one of
    ``templates`` (context templates, the first being the bare prompt ``"{}"``). Requests
    are optimised together, each with its own delta, in passes grouped by tail length;
    the result equals optimising each alone. The model's parameters are frozen for the
    duration and left unchanged.

    Returns ``v* = init + delta`` with ``init``, the layer's output before the edit, and
    per request the final loss, the final mean target NLL and the steps taken. Raises
    :class:`RequestError` naming the request when a target tokenises to nothing.

    ``on_step(step, converged, n)``, when given, is called after each optimisation step
    (1-based) with how many of the ``n`` requests have converged (progress display).
    """
    # The optimiser's tensors sit with the inputs, where the logits (so the loss) come
    # back; the routes move delta to the layer it is added at.
    device = input_device(model)
    n = len(requests)
    layers = [layout.layer(i) for i in range(z_layer + 1)]
    # A request's rows share one tail (the context templates only add a prefix), and a
    # pass runs every row to the longest tail in it: grouping requests of similar tail
    # length cuts the padding positions run per step.
    tails = [_tail_length(tokenizer, requests, rid) for rid in range(n)]
    groups = pass_groups(tails, len(templates), config)
    route = _SplitPass if config.route == "cached" else _ReferencePass
    pad = pad_id_of(tokenizer)
    all_rows = [_build_rows(tokenizer, requests, g, templates) for g in groups]
    hidden_size = model.config.get_text_config().hidden_size
    delta = torch.zeros(n, hidden_size, device=device, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=config.lr)
    init = torch.zeros(n, hidden_size, device=device)
    kl_init: dict[int, torch.Tensor] = {}
    converged = torch.zeros(n, dtype=torch.bool, device=device)
    last_loss = torch.zeros(n, device=device)
    last_nll = torch.zeros(n, device=device)
    steps_taken = torch.zeros(n, dtype=torch.long)
    history: list[float] = []
    trace: list[torch.Tensor] = []
    step_size = torch.ones(n, 1, device=device)  # adam-adapt's per-request scale
    previous_loss = torch.full((n,), float("inf"), device=device)

    with frozen_parameters(model), ExitStack() as stack:
        unembed = layout.unembed()
        passes = [
            route(model, layers, unembed, rows, pad, device, config.bf16) for rows in all_rows
        ]
        # Only the steps: the prefix passes above ran with the model as it is. The cached
        # route's steps run the layers above z_layer and the unembedding; a copy of those
        # alone bounds the extra memory.
        if config.bf16:
            steps_run = [layout.layer(i) for i in range(z_layer + 1, layout.num_layers)]
            within = None if config.route == "reference" else [*steps_run, unembed]
            stack.enter_context(linear_weights_as(model, torch.bfloat16, within))
        if config.eager_attention(device):
            stack.enter_context(attention_implementation(model, "eager"))
        for step in range(config.steps):
            fault_point("vstar")
            delta.grad = torch.zeros_like(delta)
            for g, (group, rows, fwd) in enumerate(zip(groups, all_rows, passes, strict=True)):
                ids = torch.tensor(group, device=device)
                if step > 0 and bool(converged[ids].all()):
                    continue  # every request of this group is done: skip its forward
                row_request = ids.repeat_interleave(rows.per_request)
                row_request = torch.cat([row_request, ids])
                first = rows.per_request * torch.arange(len(group), device=device)

                def remember(values: torch.Tensor, ids=ids, first=first, step=step) -> None:
                    if step == 0:
                        init[ids] = values[first].detach().float()

                token_lp, kl_lp = fwd.run(delta[row_request], remember)
                if step == 0:
                    kl_init[g] = kl_lp.detach()
                row_nll = -(token_lp * fwd.target_mask).sum(1) / fwd.target_mask.sum(1)
                nll = row_nll.view(len(group), rows.per_request).mean(1)
                kl = config.kl_factor * (kl_lp.exp() * (kl_lp - kl_init[g])).sum(-1)
                decay = config.weight_decay * delta[ids].norm(dim=1) / init[ids].norm(dim=1).pow(2)
                total = nll + kl + decay
                live = ~converged[ids]
                last_loss[ids[live]] = total.detach()[live]
                last_nll[ids[live]] = nll.detach()[live]
                active = live & (total.detach() >= config.loss_tolerance)
                if step < config.steps - 1 and bool(active.any()):
                    total[active].sum().backward()
            history.append(float(last_loss.mean()))
            trace.append(last_loss.detach().cpu().clone())
            converged |= last_loss < config.loss_tolerance
            steps_taken[(~converged).cpu()] = step + 1
            if on_step is not None:
                on_step(step + 1, int(converged.sum()), n)
            if step == config.steps - 1 or bool(converged.all()):
                break
            frozen = delta.detach().clone()
            if config.optimizer == "adam-warm":
                optimiser.param_groups[0]["lr"] = config.lr * warm_factor(step, config.steps)
            optimiser.step()
            with torch.no_grad():
                if config.optimizer == "adam-adapt":
                    rose = last_loss > previous_loss
                    grown = (step_size * 1.25).clamp(max=1.0)
                    step_size = torch.where(rose.unsqueeze(1), step_size * 0.5, grown)
                    previous_loss = last_loss.clone()
                    delta.copy_(frozen + step_size * (delta - frozen))
                # A converged request keeps the vector it converged with (Adam's
                # momentum would otherwise keep moving it).
                delta[converged] = frozen[converged]
                limit = config.clamp_factor * init.norm(dim=1, keepdim=True)
                norms = delta.norm(dim=1, keepdim=True)
                delta.mul_(torch.where(norms > limit, limit / norms, torch.ones_like(norms)))

    return VStarResult(
        vectors=(init + delta).detach(),
        init=init,
        loss=last_loss,
        nll=last_nll,
        steps=steps_taken,
        history=history,
        trace=trace,
    )
