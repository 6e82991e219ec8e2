"""Hyperspherical energy (HE) of a layer's neurons.

Neurons (rows in (out, in) layout) are normalised to the unit sphere. For s > 0,
HE = 1/(N(N−1)) Σ_{i≠j} ‖ŵi − ŵj‖^(−s) (Riesz s-kernel); for s = 0 the logarithmic
energy Σ_{i≠j} log(1/‖ŵi − ŵj‖) (unnormalised, as written in the definition). Distances
come from the Gram matrix, ‖ŵi − ŵj‖² = 2 − 2 ŵi·ŵj, in row blocks, so memory is
O(chunk · N), never N × N × d.

Coincident neurons (distance below ``COINCIDENT_DIST``) make the energy infinite: the
result is ``inf``, and :func:`coincident_pairs` counts them. A zero neuron has no
direction: that is an error.
"""

from __future__ import annotations

import math

import torch

# Below this distance the Gram-matrix route cannot tell two unit vectors apart
# (cancellation in 2 − 2cos), so such pairs are treated as coincident.
COINCIDENT_DIST = 1e-6


def unit_neurons(weight: torch.Tensor, layout: str = "out_in") -> torch.Tensor:
    rows = weight.detach().to(torch.float64)
    if layout == "in_out":
        rows = rows.T
    elif layout != "out_in":
        raise ValueError(f"layout must be 'out_in' or 'in_out', got {layout!r}")
    norms = rows.norm(dim=1, keepdim=True)
    zero = (norms.squeeze(1) == 0).nonzero().flatten()
    if len(zero):
        raise ValueError(
            f"{len(zero)} neuron(s) have zero norm (first: row {int(zero[0])}); "
            "they have no direction on the sphere, so HE is undefined"
        )
    return rows / norms


def _pair_distances(unit: torch.Tensor, chunk_size: int):
    n = unit.shape[0]
    for begin in range(0, n, chunk_size):
        block = unit[begin : begin + chunk_size]
        dist2 = (2.0 - 2.0 * block @ unit.T).clamp_min(0.0)
        rows = torch.arange(block.shape[0])
        off_diag = torch.ones_like(dist2, dtype=torch.bool)
        off_diag[rows, rows + begin] = False
        yield dist2, off_diag


def hyperspherical_energy(
    weight: torch.Tensor, s: float = 1.0, *, layout: str = "out_in", chunk_size: int = 1024
) -> float:
    """The hyperspherical energy of the neurons of ``weight``, a float in float64.

    With ŵ1..ŵN the neurons (rows in ``"out_in"`` layout, columns in ``"in_out"``) scaled
    to unit norm, for ``s > 0`` the mean Riesz s-energy over ordered pairs,
    ``HE_s = 1/(N(N−1)) Σ_{i≠j} ‖ŵi − ŵj‖^(−s)``; for ``s = 0`` the logarithmic energy
    ``Σ_{i≠j} log(1/‖ŵi − ŵj‖)`` (the kernel ``(r^(−s) − 1)/s`` as s → 0), summed and
    not averaged, as the definition writes it. ``inf`` when two neurons coincide.
    ``chunk_size`` rows of distances are held at once (memory, not the result).
    Raises ``ValueError`` for ``s < 0``, fewer than two neurons or a zero neuron.
    """
    if s < 0:
        raise ValueError(f"s must be >= 0, got {s}")
    unit = unit_neurons(weight, layout)
    n = unit.shape[0]
    if n < 2:
        raise ValueError("HE needs at least two neurons")
    total = 0.0
    for dist2, off_diag in _pair_distances(unit, chunk_size):
        d2 = dist2[off_diag]
        if bool((d2 <= COINCIDENT_DIST**2).any()):
            return math.inf
        total += float((-0.5 * d2.log()).sum() if s == 0 else d2.pow(-s / 2).sum())
    return total if s == 0 else total / (n * (n - 1))


def coincident_pairs(weight: torch.Tensor, *, layout: str = "out_in", chunk_size: int = 1024):
    """Number of ordered pairs i ≠ j of neurons pointing the same way."""
    unit = unit_neurons(weight, layout)
    count = 0
    for dist2, off_diag in _pair_distances(unit, chunk_size):
        count += int((dist2[off_diag] <= COINCIDENT_DIST**2).sum())
    return count
