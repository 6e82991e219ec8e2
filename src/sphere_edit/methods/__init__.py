"""Editing methods behind one interface (:class:`EditMethod`, or :class:`GradientMethod`
for those that need the model itself)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Importing the modules registers the built-in methods, in this order (the CLI lists them so).
from .memit import MEMIT  # isort: skip
from .alphaedit import AlphaEdit  # isort: skip
from .ft import FT  # isort: skip
from .rome import ROME  # isort: skip
from .rect import RECT  # isort: skip
from .prune import PRUNE  # isort: skip
from .ultraedit import UltraEdit  # isort: skip
from .base import EditContext, EditMethod, GradientMethod, GradientResult, LayerState
from .registry import MethodClasses as _MethodClasses
from .registry import (
    MethodInfo,
    MethodOptionError,
    Option,
    get_method,
    method_names,
    register_method,
    unregister_method,
)

# name -> class of every registered method (a live view of the registry).
METHODS: Mapping[str, type] = _MethodClasses()


def make_method(name: str, **options: Any) -> EditMethod | GradientMethod:
    """The registered method ``name`` with ``options`` checked against its declarations."""
    return get_method(name).make(**options)


__all__ = [
    "FT",
    "MEMIT",
    "METHODS",
    "MethodInfo",
    "MethodOptionError",
    "Option",
    "PRUNE",
    "RECT",
    "ROME",
    "AlphaEdit",
    "UltraEdit",
    "EditContext",
    "EditMethod",
    "GradientMethod",
    "GradientResult",
    "LayerState",
    "get_method",
    "make_method",
    "method_names",
    "register_method",
    "unregister_method",
]
