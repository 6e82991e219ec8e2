"""UltraEdit (Gu et al., 2025): lifelong editing without the v* loop.

One teacher-forced pass per batch over each request's prompt followed by its new target
(the input is prompt + target tokens but the last; the loss is the mean over the requests
of each request's mean NLL of its target tokens). Target token j of a request is predicted
by the output at position ``len(prompt) - 1 + j``: the last prompt token for j = 0, then
target token j - 1. At those positions, at every edited module (a linear map, by default
the gate and up projections of the MLP), the pass records the module's input k (the key)
and the gradient g of the loss with respect to its output.

A lifelong normaliser per module keeps the exact running count, mean and sum of squared
deviations (M2) of the concatenated features [k, g] over every batch so far (Chan et al.'s
parallel update of Welford's statistics); each batch is standardised with the statistics
that include it: k̂ = (k − μ_k) / σ_k, ĝ = (g − μ_g) / σ_g, σ² = M2 / count + ε.

Each row's pseudo-value is v̂ = −lr ‖k̂‖² ĝ, and the module's update solves the ridge
problem over the raw keys, (KᵀK + λI) ΔWᵀ = KᵀV̂, with K (n, in) the keys as the module
sees them, V̂ (n, out) the pseudo-values and ΔW (out, in): so ΔW k ≈ v̂ at every key
(where λ is small against ‖k‖²), the output moves by the scaled, standardised negative
gradient. This is the authors' code (``predict_param_shifts`` of their
``editor/ultraedit.py``: the standardised keys enter only the coefficients); their paper's
description and this package's first reading solved over the standardised keys K̂ and
rescaled row o of ΔW by σ_g,o, which is ``standardised_solve=True``: ΔW is then solved
for standardised keys but acts on raw ones.

The session journals each module's normaliser after every batch (the method state of
:meth:`UltraEdit.update`), so that a resumed or rolled-back session continues from
bitwise the same statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from ..common.linalg import solve
from ..editing.requests import EditRequest
from ..model.arch import ModelLayout
from ..model.hooks import frozen_parameters
from ..model.placement import index_on, input_device
from .ft import _TeacherForcing
from .registry import Option, register_method

# Added to the running variance before the square root: a feature that has not varied yet
# (one token so far, or a dead unit) standardises to 0 rather than to a division by zero.
VARIANCE_FLOOR = 1e-8
# UltraEdit's band on Llama-3-8B, layers 18-26 of 32, as shares of the depth.
BAND = (18 / 32, 26 / 32)


@dataclass(frozen=True)
class Normaliser:
    """Exact streaming statistics of feature rows: ``count`` (shape (1,): a journal's
    tensors have at least one dimension), ``mean`` and ``m2`` (the sum of squared
    deviations from the mean), all float64."""

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def empty(cls, dim: int) -> Normaliser:
        zeros = torch.zeros(dim, dtype=torch.float64)
        return cls(torch.zeros(1, dtype=torch.float64), zeros, zeros.clone())

    def updated(self, rows: torch.Tensor) -> Normaliser:
        """The statistics of everything seen so far and ``rows`` (n, dim), by Chan et al.'s
        update: the batch's own mean and M2, merged with the running ones."""
        rows = rows.double()
        n = torch.tensor([float(rows.shape[0])], dtype=torch.float64)
        batch_mean = rows.mean(0)
        batch_m2 = ((rows - batch_mean) ** 2).sum(0)
        total = self.count + n
        shift = batch_mean - self.mean
        mean = self.mean + shift * (n / total)
        m2 = self.m2 + batch_m2 + shift**2 * (self.count * n / total)
        return Normaliser(total, mean, m2)

    @property
    def variance(self) -> torch.Tensor:
        """The population variance M2 / count of each feature."""
        return self.m2 / self.count

    @property
    def std(self) -> torch.Tensor:
        return torch.sqrt(self.variance + VARIANCE_FLOOR)

    def standardise(self, rows: torch.Tensor) -> torch.Tensor:
        return (rows.double() - self.mean) / self.std

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> Normaliser:
        return cls(tensors["count"], tensors["mean"], tensors["m2"])


def ridge_update(keys: torch.Tensor, values: torch.Tensor, ridge: float) -> torch.Tensor:
    """ΔW (out, in) solving (KᵀK + λI) ΔWᵀ = KᵀV for keys K (n, in), values V (n, out)."""
    eye = torch.eye(keys.shape[1], dtype=keys.dtype)
    return solve(keys.T @ keys + ridge * eye, keys.T @ values, what="ultraedit ridge system").T


@register_method(
    help="one gradient pass per batch, lifelong-normalised ridge update of gate and up",
    options=(
        Option("lr", float, 3e-4, "scale of the pseudo-values -lr |k|^2 g", low=0, low_open=True),
        Option("ridge", float, 1.0, "ridge weight λ of the solve", low=0, low_open=True),
        Option(
            "standardised_solve",
            bool,
            False,
            "solve over the standardised keys and rescale by σ_g (the first reading; "
            "default: the authors' code, raw keys, no rescale)",
        ),
    ),
)
@dataclass(frozen=True)
class UltraEdit:
    """UltraEdit: see the module docstring. The session calls :meth:`capture` once per
    batch on the weights before it, then :meth:`update` per edited (layer, module)."""

    name: ClassVar[str] = "ultraedit"
    needs_statistics: ClassVar[bool] = False
    # The modules of each layer it edits (what the session snapshots, journals, projects).
    modules: ClassVar[tuple[str, ...]] = ("gate", "up")
    lr: float = 3e-4
    ridge: float = 1.0
    standardised_solve: bool = False

    def modules_for(self, layout: ModelLayout) -> tuple[str, ...]:
        """The gate and up projections; the up projection alone where the MLP has no gate
        (GPT-2, GPT-J: their one input projection)."""
        return ("gate", "up") if layout.spec.layer_mlp_gate is not None else ("up",)

    @staticmethod
    def default_layers(num_layers: int) -> list[int]:
        """UltraEdit's band of middle-to-late layers scaled to the depth: 18-26 of 32, so
        17-24 of SmolLM2's 30 and 10-15 of Gemma-3-270M's 18."""
        first = min(num_layers - 1, round(BAND[0] * num_layers))
        last = max(first, min(num_layers - 1, round(BAND[1] * num_layers)))
        return list(range(first, last + 1))

    def capture(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        layout: ModelLayout,
        requests: Sequence[EditRequest],
        sites: Sequence[tuple[int, str]],
    ) -> tuple[dict[int, torch.Tensor], dict[tuple[int, str], torch.Tensor], list[float]]:
        """One teacher-forced pass: the keys per layer (n_tokens, in; the modules of a
        layer share their input), the gradients per (layer, module) (n_tokens, out), both
        float64 on the CPU and in the same token order, and each request's NLL."""
        batch = _TeacherForcing(tokenizer, requests, input_device(model))
        inputs: dict[tuple[int, str], torch.Tensor] = {}
        outputs: dict[tuple[int, str], torch.Tensor] = {}

        def hook(site: tuple[int, str]):
            def record(_module, args, output):
                if not output.requires_grad:  # the parameters are frozen: start a graph here
                    output.requires_grad_(True)
                inputs[site], outputs[site] = args[0].detach(), output
                return output

            return record

        handles = [layout.module(layer, name).register_forward_hook(hook((layer, name)))
                   for layer, name in sites]  # fmt: skip
        try:
            with frozen_parameters(model):
                nll = batch.nll(model)
                grads = torch.autograd.grad(nll.mean(), [outputs[site] for site in sites])
        finally:
            for handle in handles:
                handle.remove()
            outputs.clear()
        rows = torch.arange(len(batch.ids), device=batch.ids.device).unsqueeze(1)
        picked = batch.mask.bool()

        def gather(values: torch.Tensor) -> torch.Tensor:
            # A capture is on its module's device, the positions on the inputs'.
            return index_on(index_on(values, rows, batch.cols), picked).detach().double().cpu()

        keys = {layer: gather(inputs[(layer, name)]) for layer, name in sites}
        gradients = {site: gather(grad) for site, grad in zip(sites, grads, strict=True)}
        return keys, gradients, [float(x) for x in nll.detach()]

    def update(
        self,
        keys: torch.Tensor,
        gradients: torch.Tensor,
        method_state: Mapping[str, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """ΔW (out, in) in float64 for one module, from its keys (n, in) and gradients
        (n, out), and its normaliser after this batch (``method_state``: before it, or
        ``None`` for the first batch)."""
        d_in = keys.shape[1]
        features = torch.cat([keys.double(), gradients.double()], dim=1)
        prior = Normaliser.empty(features.shape[1])
        if method_state:
            prior = Normaliser.from_tensors(method_state)
        normaliser = prior.updated(features)
        standard = normaliser.standardise(features)
        k_hat, g_hat = standard[:, :d_in], standard[:, d_in:]
        values = -self.lr * (k_hat**2).sum(1, keepdim=True) * g_hat
        if not self.standardised_solve:
            return ridge_update(keys.double(), values, self.ridge), normaliser.tensors()
        delta = ridge_update(k_hat, values, self.ridge)
        delta = delta * normaliser.std[d_in:].unsqueeze(1)
        return delta, normaliser.tensors()

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **asdict(self)}
