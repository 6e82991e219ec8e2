"""Comparing stored settings with the ones a command gives, to name what differs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def first_difference(
    stored: Mapping[str, Any], mine: Mapping[str, Any], keys: Iterable[str] | None = None
) -> tuple[str, Any, Any] | None:
    """The first of ``keys`` (default: every key of either mapping, sorted) whose value in
    ``stored`` differs from the one in ``mine``, with both values (``None`` where a mapping
    lacks the key); ``None`` when they all agree. Callers word the error, as only they know
    which option to repeat."""
    names = sorted(set(stored) | set(mine)) if keys is None else keys
    for key in names:
        if stored.get(key) != mine.get(key):
            return key, stored.get(key), mine.get(key)
    return None
