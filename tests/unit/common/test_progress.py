"""The progress reporter: a bar on a terminal, plain timed lines elsewhere, and the v*
callback that feeds it."""

from __future__ import annotations

import io

import torch

from sphere_edit.common.progress import Progress, format_seconds
from sphere_edit.editing.requests import EditRequest
from sphere_edit.editing.vstar import VStarConfig, compute_vstar
from sphere_edit.model.arch import ModelLayout
from tests.tiny_models import make_tiny_model


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Pipe(io.StringIO):
    """A stream that is not a terminal (a log file, CI)."""

    def isatty(self) -> bool:
        return False


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_seconds():
    assert format_seconds(0) == "0:00"
    assert format_seconds(75) == "1:15"
    assert format_seconds(3725) == "1:02:05"


def test_plain_lines_at_most_one_per_interval_and_one_at_the_end():
    clock, stream = Clock(), Pipe()
    bar = Progress("v* steps", 100, stream=stream, interval=30.0, clock=clock)
    assert not bar.interactive  # chosen from the stream: not a terminal
    for step in range(1, 101):
        clock.now += 1.0  # one second a step: lines due at 30 s, 60 s, 90 s
        bar.update(step, f"{step // 10}/10 requests converged")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines == [
        "v* steps: 30/100, 3/10 requests converged, ETA 1:10",
        "v* steps: 60/100, 6/10 requests converged, ETA 0:40",
        "v* steps: 90/100, 9/10 requests converged, ETA 0:10",
        "v* steps: 100/100, 10/10 requests converged, 1:40 elapsed",
    ]
    bar.close()  # a second close writes nothing more
    assert len(stream.getvalue().splitlines()) == 4


def test_a_short_loop_writes_only_its_end():
    clock, stream = Clock(), Pipe()
    bar = Progress("evaluation rows", 5, stream=stream, clock=clock)
    for done in range(1, 6):
        clock.now += 0.5
        bar.update(done)
    bar.close()
    assert stream.getvalue() == "evaluation rows: 5/5, 0:02 elapsed\n"


def test_a_loop_that_stops_early_ends_with_where_it_stopped():
    clock, stream = Clock(), Pipe()
    bar = Progress("v* steps", 25, stream=stream, clock=clock)
    clock.now += 10.0
    bar.update(4, "3/3 requests converged")
    bar.close()
    assert stream.getvalue() == "v* steps: 4/25, 3/3 requests converged, ETA 0:52\n"


def test_terminal_mode_redraws_one_bar_in_place():
    clock, stream = Clock(), Terminal()
    bar = Progress("key passes", 4, stream=stream, clock=clock)
    assert bar.interactive
    for done in range(1, 5):
        clock.now += 2.0
        bar.update(done, f"layer {done}")
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n") and text.count("\n") == 1
    assert "\r[######..................] key passes: 1/4, layer 1, ETA 0:06" in text
    assert "[########################] key passes: 4/4, layer 4, 0:08 elapsed" in text


def test_disabled_writes_nothing():
    stream = Terminal()
    bar = Progress("v* steps", 3, stream=stream, enabled=False)
    bar.update(1)
    bar.close()
    assert stream.getvalue() == ""


def test_vstar_callback_sees_every_step_and_leaves_the_result_unchanged(tiny_tokenizer):
    model = make_tiny_model("llama", tiny_tokenizer, seed=0)
    layout = ModelLayout.of(model)
    requests = [
        EditRequest.create("{} is located in", "Toronto", "France"),
        EditRequest.create("{} plays the", "John", "guitar"),
    ]
    config = VStarConfig(steps=6)
    args = (model, tiny_tokenizer, layout, 1, requests, ["{}"], config)
    plain = compute_vstar(*args)
    calls: list[tuple[int, int, int]] = []
    watched = compute_vstar(*args, on_step=lambda *call: calls.append(call))
    assert torch.equal(plain.vectors, watched.vectors)
    assert torch.equal(plain.loss, watched.loss)
    assert [step for step, _, _ in calls] == list(range(1, len(plain.history) + 1))
    assert all(n == 2 for _, _, n in calls)
    converged = (watched.loss < config.loss_tolerance).sum().item()
    assert calls[-1][1] == converged
