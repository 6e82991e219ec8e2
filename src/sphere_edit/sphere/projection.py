"""The SPHERE projection: keep updates away from the principal directions of the neurons.

Neurons are the rows of the edited weight in (out, in) layout, each a vector over the key
dimension. With Ŵ the row-normalised weight and C = ŴᵀŴ / N, let U hold the top
eigenvectors of C whose eigenvalues first reach the share η of the total. Any update is
projected as ΔW ← ΔW (I − α U Uᵀ), which damps the components of ΔW along the
directions the neurons concentrate in, the ones whose perturbation moves the
hyperspherical energy most.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Basis = Literal["current", "pre_edit"]


def normalize_rows(weight: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return weight / weight.norm(dim=1, keepdim=True).clamp_min(eps)


def eig_descending_direct(normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of C = ŴᵀŴ/N (d × d), eigenvalues in decreasing order."""
    n = normed.shape[0]
    values, vectors = torch.linalg.eigh(normed.T @ normed / n)
    return values.flip(0), vectors.flip(1)


def eig_descending_gram(normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-zero eigenpairs of C = ŴᵀŴ/N through the N × N Gram matrix ŴŴᵀ/N.

    If ŴŴᵀ/N v = λ v then C (Ŵᵀv) = λ (Ŵᵀv) and ‖Ŵᵀv‖² = N λ, so u = Ŵᵀv / √(Nλ).
    Cheaper when N < d. Only eigenvalues above a round-off floor are returned.
    """
    n = normed.shape[0]
    values, vectors = torch.linalg.eigh(normed @ normed.T / n)
    values, vectors = values.flip(0), vectors.flip(1)
    floor = values[0].clamp_min(0) * max(normed.shape) * torch.finfo(normed.dtype).eps
    keep = values > floor
    values, vectors = values[keep], vectors[:, keep]
    directions = normed.T @ vectors / torch.sqrt(n * values)
    return values, directions


def principal_directions(
    weight: torch.Tensor, eta: float, *, method: Literal["auto", "gram", "direct"] = "auto"
) -> torch.Tensor:
    """U (d × r): the fewest top eigenvectors of C whose eigenvalue share reaches ``eta``.

    Computed in float64. ``weight`` is in (out, in) layout (rows are neurons).
    """
    if not 0 < eta <= 1:
        raise ValueError(f"eta must be in (0, 1], got {eta}")
    normed = normalize_rows(weight.detach().to(torch.float64))
    n, d = normed.shape
    if method == "auto":
        method = "gram" if n < d else "direct"
    eig = eig_descending_gram if method == "gram" else eig_descending_direct
    values, vectors = eig(normed)
    values = values.clamp_min(0)
    # trace(C) = 1 for unit rows, but sum what we have to stay exact under truncation.
    share = values.cumsum(0) / values.sum()
    rank = int(torch.searchsorted(share, torch.tensor(eta, dtype=share.dtype) - 1e-12)) + 1
    return vectors[:, : min(rank, vectors.shape[1])]


@dataclass(frozen=True)
class SphereProjection:
    """ΔW ← ΔW (I − α U Uᵀ); one transform applied to any method's per-layer update.

    Fields:

    - ``eta`` in (0, 1]: U holds the fewest top eigenvectors of C = ŴᵀŴ / N (Ŵ the
      row-normalised weight) whose eigenvalues reach this share of the total.
    - ``alpha`` in [0, 1]: how much of the update's component along U is removed; 0
      leaves the update as it is, 1 removes that component entirely.
    - ``basis``: ``"current"`` takes U from the weights as they are when the update is
      made (as in the authors' code); ``"pre_edit"`` from the weights before the first
      edit (as the paper's text says).
    """

    eta: float = 0.5
    alpha: float = 0.5
    basis: Basis = "current"

    def __post_init__(self) -> None:
        if not 0 < self.eta <= 1:
            raise ValueError(f"SPHERE eta must be in (0, 1], got {self.eta}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"SPHERE alpha must be in [0, 1], got {self.alpha}")
        if self.basis not in ("current", "pre_edit"):
            raise ValueError(f"SPHERE basis must be 'current' or 'pre_edit', got {self.basis!r}")

    def directions(self, current: torch.Tensor, pre_edit: torch.Tensor) -> torch.Tensor:
        return principal_directions(current if self.basis == "current" else pre_edit, self.eta)

    def projector(self, directions: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(directions.shape[0], dtype=directions.dtype, device=directions.device)
        return eye - self.alpha * directions @ directions.T

    def __call__(
        self, delta: torch.Tensor, *, current: torch.Tensor, pre_edit: torch.Tensor
    ) -> torch.Tensor:
        """Project ``delta`` (out, in); ``current``/``pre_edit`` are weights in (out, in)."""
        u = self.directions(current, pre_edit).to(delta.device)
        # ΔW (I − α U Uᵀ) = ΔW − α (ΔW U) Uᵀ: never forms the d × d matrix.
        projected = delta.double() - self.alpha * (delta.double() @ u) @ u.T
        return projected.to(delta.dtype)

    def describe(self) -> str:
        return f"SPHERE(eta={self.eta}, alpha={self.alpha}, basis={self.basis})"
