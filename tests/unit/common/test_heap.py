"""Giving freed heap memory back: a real effect on glibc, harmless elsewhere."""

from __future__ import annotations

import ctypes.util
import platform

import pytest

from sphere_edit.common import heap
from sphere_edit.common.heap import release_free_memory


def _resident_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_release_free_memory_reports_what_malloc_trim_says(monkeypatch):
    calls = []

    def trim(pad: int) -> int:
        calls.append(pad)
        return len(calls) - 1  # 0 on the first call: nothing returned

    monkeypatch.setattr(heap, "_malloc_trim", lambda: trim)
    assert release_free_memory() is False
    assert release_free_memory() is True
    assert calls == [0, 0]  # no padding kept at the top of the heap


def test_release_free_memory_is_a_no_op_without_malloc_trim(monkeypatch):
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    assert release_free_memory() is False


@pytest.mark.skipif(
    platform.system() != "Linux" or "libc.so.6" not in str(ctypes.util.find_library("c")),
    reason="glibc only",
)
def test_freed_small_blocks_go_back_to_the_system():
    # Many blocks under glibc's mmap threshold land on the heap; freeing all but the
    # last keeps them resident (the last one pins the top of the heap) until a trim.
    blocks = [bytearray(64 * 1024) for _ in range(1600)]  # 100 MiB, touched
    keep = blocks[-1]
    del blocks
    before = _resident_kib()
    assert release_free_memory()
    after = _resident_kib()
    assert before - after > 50 * 1024, (before, after)
    assert len(keep) == 64 * 1024
