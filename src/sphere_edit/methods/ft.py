"""FT: constrained fine-tuning of one MLP output projection.

Adam on the weight alone, minimising the NLL of each request's target tokens after its
prompt (teacher forcing; mean over the target tokens, then over the requests). After every
step each entry is clamped to within ε of its value at the start of the call (the
L∞ constraint of ROME's FT-L baseline); ``epsilon=None`` fine-tunes unconstrained.
The prompts are the requests' own, without context templates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from ..editing.requests import EditRequest, RequestError
from ..editing.text import encode, pad_id_of, pad_left, target_token_ids
from ..model.hooks import frozen_parameters
from ..model.placement import input_device
from .base import EditContext, GradientResult
from .registry import Option, register_method


@register_method(
    help="fine-tuning of one layer, each entry within epsilon of its start",
    options=(
        Option(
            "epsilon",
            float,
            2e-3,
            "L∞ bound of the change; null: unconstrained",
            low=0,
            low_open=True,
            nullable=True,
        ),
        Option("lr", float, 5e-4, "Adam learning rate", low=0, low_open=True),
        Option("steps", int, 25, "Adam steps", low=1),
    ),
)
@dataclass(frozen=True)
class FT:
    name: ClassVar[str] = "ft"
    single_layer: ClassVar[bool] = True
    needs_statistics: ClassVar[bool] = False
    epsilon: float | None = 2e-3
    lr: float = 5e-4
    steps: int = 25

    def compute(
        self, context: EditContext, requests: Sequence[EditRequest], layer: int
    ) -> GradientResult:
        model, layout = context.model, context.layout
        weight = layout.mlp_out(layer).weight
        start = weight.detach().clone()
        batch = _TeacherForcing(context.tokenizer, requests, input_device(model))
        try:
            with frozen_parameters(model):
                weight.requires_grad_(True)
                optimiser = torch.optim.Adam([weight], lr=self.lr)
                for _ in range(self.steps):
                    optimiser.zero_grad(set_to_none=True)
                    batch.nll(model).mean().backward()
                    optimiser.step()
                    if self.epsilon is not None:
                        with torch.no_grad():
                            bound = (weight - start).clamp(-self.epsilon, self.epsilon)
                            weight.copy_(start + bound)
            with torch.no_grad():
                loss = batch.nll(model)
                delta = weight.detach() - start
                if self.epsilon is not None:
                    # start + bound may round past the bound; the returned ΔW never does.
                    delta = delta.clamp(-self.epsilon, self.epsilon)
        finally:
            weight.grad = None
            with torch.no_grad():
                weight.copy_(start)
        delta = layout.to_storage_layout(delta)  # the transpose is its own inverse
        return GradientResult(
            delta=delta.double().cpu(), loss=[float(x) for x in loss], steps=self.steps
        )

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **asdict(self)}


class _TeacherForcing:
    """Prompt + target tokens (but the last) of every request, left-padded, and where
    each target token is predicted."""

    def __init__(self, tokenizer, requests: Sequence[EditRequest], device: torch.device):
        rows, targets, starts = [], [], []
        for i, request in enumerate(requests):
            try:
                target = target_token_ids(tokenizer, request.text, request.target_new)
            except RequestError as error:
                raise error.at(i, "target_new") from None
            prompt = encode(tokenizer, request.text)
            rows.append(prompt + target[:-1])
            targets.append(target)
            starts.append(len(prompt) - 1)
        batch = pad_left(rows, [0] * len(rows), pad_id_of(tokenizer), device)
        self.inputs = batch.model_inputs()
        width = batch.input_ids.shape[1]
        longest = max(len(t) for t in targets)
        ids = torch.zeros(len(rows), longest, dtype=torch.long)
        mask = torch.zeros(len(rows), longest)
        cols = torch.zeros(len(rows), longest, dtype=torch.long)
        for i, (target, start, row) in enumerate(zip(targets, starts, rows, strict=True)):
            shift = width - len(row)
            ids[i, : len(target)] = torch.tensor(target)
            mask[i, : len(target)] = 1.0
            cols[i] = (shift + start + torch.arange(longest)).clamp(max=width - 1)
        self.ids, self.mask, self.cols = ids.to(device), mask.to(device), cols.to(device)

    def nll(self, model: torch.nn.Module) -> torch.Tensor:
        """(n,) mean NLL of each request's target tokens."""
        logits = model(**self.inputs).logits
        rows = torch.arange(len(self.ids), device=self.ids.device).unsqueeze(1)
        log_probs = logits[rows, self.cols].float().log_softmax(-1)
        token = log_probs.gather(2, self.ids.unsqueeze(-1)).squeeze(-1)
        return -(token * self.mask).sum(1) / self.mask.sum(1)
