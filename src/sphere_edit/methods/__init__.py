"""Editing methods behind one interface (:class:`EditMethod`)."""

from __future__ import annotations

from typing import Any

from .alphaedit import AlphaEdit
from .base import EditMethod, LayerState
from .memit import MEMIT

METHODS: dict[str, type] = {"memit": MEMIT, "alphaedit": AlphaEdit}


def make_method(name: str, **options: Any) -> EditMethod:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name](**options)


__all__ = ["METHODS", "AlphaEdit", "EditMethod", "LayerState", "MEMIT", "make_method"]
