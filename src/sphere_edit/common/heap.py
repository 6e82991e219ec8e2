"""Give freed heap memory back to the operating system between the phases of a run.

Why: glibc keeps freed blocks for reuse. The v* loop frees autograd graphs of hundreds of
MiB every pass, and what it leaves behind is fragmented: the next phase (keys, the
checkpoint evaluation) allocates blocks of other sizes, and the resident size of a long
run climbs to the sum of its phases' peaks instead of their maximum. ``malloc_trim``
returns the free pages. A no-op where the C library has no ``malloc_trim`` (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


@cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return free heap pages to the OS; True when some were returned."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
