"""Editing methods behind one interface (:class:`EditMethod`, or :class:`GradientMethod`
for those that need the model itself)."""

from __future__ import annotations

from typing import Any

from .alphaedit import AlphaEdit
from .base import EditContext, EditMethod, GradientMethod, GradientResult, LayerState
from .ft import FT
from .memit import MEMIT
from .prune import PRUNE
from .rect import RECT
from .rome import ROME

METHODS: dict[str, type] = {
    "memit": MEMIT,
    "alphaedit": AlphaEdit,
    "ft": FT,
    "rome": ROME,
    "rect": RECT,
    "prune": PRUNE,
}


def make_method(name: str, **options: Any) -> EditMethod | GradientMethod:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name](**options)


__all__ = [
    "FT",
    "MEMIT",
    "METHODS",
    "PRUNE",
    "RECT",
    "ROME",
    "AlphaEdit",
    "EditContext",
    "EditMethod",
    "GradientMethod",
    "GradientResult",
    "LayerState",
    "make_method",
]
