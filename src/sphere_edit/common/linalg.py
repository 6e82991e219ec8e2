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


# -- on the model's device (issue 23) ---------------------------------------------------------

# float64 counts as fast on a device whose float64 matmul runs at least this share of its
# float32 one (data-centre GPUs: 1/2; consumer GPUs: 1/32 or 1/64).
FAST_FLOAT64_SHARE = 0.25
_FLOAT64_FAST: dict[str, bool] = {}


def float64_is_fast(device: torch.device) -> bool:
    """Whether ``device`` runs float64 at a useful share of float32 (probed once per device
    and process; the CPU always counts as fast: it is where float64 solves ran before)."""
    if device.type == "cpu":
        return True
    key = str(device)
    if key not in _FLOAT64_FAST:
        from .precision import matmul_gflops

        fp64 = matmul_gflops(torch.float64, device, size=2048, seconds=0.2)
        fp32 = matmul_gflops(torch.float32, device, size=2048, seconds=0.2)
        _FLOAT64_FAST[key] = fp64 >= FAST_FLOAT64_SHARE * fp32
    return _FLOAT64_FAST[key]


def refined_solve(
    matrix: torch.Tensor,
    rhs: torch.Tensor,
    *,
    low: torch.dtype = torch.float32,
    iterations: int = 10,
) -> tuple[torch.Tensor, int]:
    """``matrix⁻¹ rhs`` in float64 from an LU factorisation in ``low`` precision, by
    iterative refinement: x ← x + LU⁻¹(rhs − matrix x) with the residual in float64,
    until a correction no longer halves the residual (or ``iterations`` corrections).
    For a system whose condition number times ``low``'s epsilon is well below 1 this
    reaches the residual of a float64 solve at the cost of one low-precision
    factorisation and a few float64 products. Returns (x, corrections made)."""
    a = matrix.double()
    b = rhs.double()
    lu, pivots, info = torch.linalg.lu_factor_ex(a.to(low))
    if int(info) != 0:
        raise ValueError(f"refined_solve: the {low} factorisation is singular (pivot {int(info)})")

    def correction(residual: torch.Tensor) -> torch.Tensor:
        return torch.linalg.lu_solve(lu, pivots, residual.to(low)).double()

    x = correction(b)
    residual = b - a @ x
    size = float(residual.norm())
    done = 0
    while done < iterations and size > 0:
        candidate = x + correction(residual)
        after = b - a @ candidate
        if not float(after.norm()) < 0.5 * size:
            break
        x, residual, size = candidate, after, float(after.norm())
        done += 1
    return x, done


def solve_on(
    device: torch.device | None,
    matrix: torch.Tensor,
    rhs: torch.Tensor,
    *,
    what: str = "linear system",
) -> torch.Tensor:
    """:func:`solve` where the model is: on a GPU the system moves there and is solved in
    float64 where the device does float64 fast, else by :func:`refined_solve` from a float32
    factorisation (falling back to float64 there if refinement stalls above float64's
    residual); on the CPU (or ``None``) it is :func:`solve` itself. The result is float64
    on ``matrix``'s device."""
    if device is None or device.type == "cpu":
        return solve(matrix, rhs, what=what)
    home = matrix.device
    a, b = matrix.to(device, torch.float64), rhs.to(device, torch.float64)
    return refined_or_direct(a, b, what=what, direct=float64_is_fast(device)).to(home)


def refined_or_direct(
    matrix: torch.Tensor, rhs: torch.Tensor, *, what: str, direct: bool
) -> torch.Tensor:
    """:func:`solve` in float64 (``direct``), or :func:`refined_solve` from float32 with
    :func:`solve` as the fallback where refinement stops above a float64 solve's residual
    (a system too ill-conditioned for a float32 factorisation)."""
    if direct:
        return solve(matrix, rhs, what=what)
    vector = rhs.ndim == 1
    try:
        x, _ = refined_solve(matrix, rhs.unsqueeze(1) if vector else rhs)
    except ValueError:  # singular in float32
        return solve(matrix, rhs, what=what)
    x = x.squeeze(1) if vector else x
    floor = 64 * torch.finfo(torch.float64).eps * float(matrix.norm()) * float(x.norm())
    if not bool(torch.isfinite(x).all()) or float((rhs - matrix @ x).norm()) > floor:
        return solve(matrix, rhs, what=what)
    return x
