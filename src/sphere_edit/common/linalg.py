"""Linear solves that notice an ill-conditioned system and fall back to least squares.

An LU factorisation with partial pivoting is tried first (what ``torch.linalg.solve``
does). The system counts as ill-conditioned when LU reports an exactly zero pivot, when
the smallest pivot is below ``RCOND`` times the largest (a cheap estimate of 1/cond that
costs nothing beyond the factorisation), or when the solution is not finite. Then the
minimum-norm least-squares solution is used instead (LAPACK ``gelsd``, an SVD with small
singular values cut off) and an :class:`IllConditionedWarning` says so; the session records
it in the batch result and the journal.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

RCOND = 1e-12


class IllConditionedWarning(RuntimeWarning):
    """A solve fell back to least squares; the message says which system and why."""


@dataclass
class Factorization:
    """LU factors of ``matrix``, or the reason they are not used (``None``: LU is fine)."""

    matrix: torch.Tensor
    lu: torch.Tensor | None
    pivots: torch.Tensor | None
    reason: str | None

    def solve(self, rhs: torch.Tensor, *, what: str = "linear system") -> torch.Tensor:
        vector = rhs.ndim == 1
        b = rhs.unsqueeze(1) if vector else rhs
        x = None
        reason = self.reason
        if reason is None:
            assert self.lu is not None and self.pivots is not None
            x = torch.linalg.lu_solve(self.lu, self.pivots, b)
            if not bool(torch.isfinite(x).all()):
                x, reason = None, "the LU solution is not finite"
        if x is None:
            warnings.warn(
                IllConditionedWarning(
                    f"{what} is ill-conditioned ({reason}); solved by least squares instead"
                ),
                stacklevel=2,
            )
            x = least_squares(self.matrix, b)
        return x.squeeze(1) if vector else x


def factorize(matrix: torch.Tensor) -> Factorization:
    lu, pivots, info = torch.linalg.lu_factor_ex(matrix)
    if int(info) != 0:
        return Factorization(matrix, None, None, f"exactly singular: pivot {int(info)} is zero")
    diag = lu.diagonal().abs()
    top = float(diag.max())
    ratio = float(diag.min()) / top if top > 0 else 0.0
    if not ratio >= RCOND:  # also catches NaN
        return Factorization(
            matrix, None, None, f"smallest/largest LU pivot {ratio:.1e} < {RCOND:g}"
        )
    return Factorization(matrix, lu, pivots, None)


def solve(matrix: torch.Tensor, rhs: torch.Tensor, *, what: str = "linear system") -> torch.Tensor:
    """``matrix⁻¹ rhs``, by least squares if the system is ill-conditioned (with a warning)."""
    return factorize(matrix).solve(rhs, what=what)


def least_squares(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """The minimum-norm least-squares solution; singular values below ``n·eps·σ_max``
    are treated as zero."""
    if matrix.device.type == "cpu":
        return torch.linalg.lstsq(matrix, rhs, driver="gelsd").solution
    # CUDA's lstsq ("gels") needs full rank; the pseudo-inverse does not.
    return torch.linalg.pinv(matrix) @ rhs
