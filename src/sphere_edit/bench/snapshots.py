"""The weights every method of a benchmark may change, copied before the first method and
put back after each, so that every method starts from the same base model."""

from __future__ import annotations

import torch

from ..model.loading import LoadedModel


def editable_modules(loaded: LoadedModel, layer: int) -> list[torch.nn.Module]:
    """Every module of ``layer`` some method may change: the MLP output projection and,
    where the family has them, the gate and up projections (UltraEdit)."""
    layout, found = loaded.layout, []
    for name in ("mlp_out", "gate", "up"):
        try:
            found.append(layout.module(layer, name))
        except ValueError:  # the family has no such module (an ungated MLP's gate)
            continue
    return found


def snapshot_edited(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """Every parameter any method may change, in every layer."""
    return {
        f"layer{i}.{m}.{name}": param.detach().clone()
        for i in range(loaded.layout.num_layers)
        for m, module in enumerate(editable_modules(loaded, i))
        for name, param in module.named_parameters()
    }


def restore_edited(loaded: LoadedModel, base: dict[str, torch.Tensor]) -> None:
    """Put :func:`snapshot_edited`'s copies back, bitwise."""
    with torch.no_grad():
        for i in range(loaded.layout.num_layers):
            for m, module in enumerate(editable_modules(loaded, i)):
                for name, param in module.named_parameters():
                    param.copy_(base[f"layer{i}.{m}.{name}"])
