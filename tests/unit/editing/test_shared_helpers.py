"""Small helpers shared by several modules: naming the first differing setting,
renumbering a request error, timing a phase."""

from __future__ import annotations

import time

from sphere_edit.common.settings import first_difference
from sphere_edit.editing.requests import RequestError
from sphere_edit.editing.session import _timed


def test_first_difference():
    assert first_difference({"a": 1, "b": 2}, {"b": 2, "a": 1}) is None
    # Every key of either side, in sorted order; a missing key reads as None.
    assert first_difference({"b": 1, "c": 3}, {"b": 2, "a": 0}) == ("a", None, 0)
    assert first_difference({"b": 1, "c": 3}, {"b": 2, "c": 4}) == ("b", 1, 2)
    # Only the given keys, in the given order.
    assert first_difference({"b": 1, "c": 3}, {"b": 2, "c": 4}, ["c", "b"]) == ("c", 3, 4)
    assert first_difference({"b": 1, "c": 3}, {"b": 2, "c": 3}, ["c"]) is None


def test_request_error_at_renumbers_without_parsing_the_message():
    error = RequestError("target: has ': ' in it", index=0, field="prompt")
    moved = error.at(7)
    assert (moved.index, moved.field, moved.reason) == (7, "prompt", error.reason)
    assert str(moved) == "request 7, field 'prompt': target: has ': ' in it"
    assert str(RequestError("empty").at(2, "target_new")) == "request 2, field 'target_new': empty"


def test_timed_adds_up_the_seconds_of_each_phase():
    timings: dict[str, float] = {"keys": 1.0}
    with _timed(timings, "keys"):
        time.sleep(0.01)
    with _timed(timings, "solve"):
        pass
    assert timings["keys"] >= 1.01
    assert 0.0 <= timings["solve"] < 0.5
    assert list(timings) == ["keys", "solve"]
