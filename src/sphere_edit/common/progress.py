"""Progress of long loops (v* steps, evaluation passes) as a user reads it.

On a terminal a :class:`Progress` redraws one bar in place; when stderr is not a terminal
(a log file, CI) carriage returns would pile up into one unreadable line, so it writes a
plain line at most every ``interval`` seconds and one at the end instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

BAR_WIDTH = 24
PLAIN_INTERVAL = 30.0


def format_seconds(seconds: float) -> str:
    """``75`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """A progress reporter for ``total`` units of work labelled ``label``.

    ``update(done, note)`` says how far the work is (``note``: e.g. "3/10 converged");
    ``close()`` writes the final state. ``interactive`` picks the mode (default: whether
    ``stream`` is a terminal); ``enabled=False`` makes every call a no-op.
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        interval: float = PLAIN_INTERVAL,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = max(0, total)
        self.stream = stream if stream is not None else sys.stderr
        if interactive is None:
            isatty = getattr(self.stream, "isatty", None)
            interactive = bool(isatty and isatty())
        self.interactive = interactive
        self.interval = interval
        self.enabled = enabled
        self.clock = clock
        self.started = clock()
        self.last_line: float | None = None
        self.done = 0
        self.note = ""
        self.closed = False

    def eta(self) -> float | None:
        """Seconds left at the rate so far; None before the first unit or at the end."""
        if self.done <= 0 or self.done >= self.total:
            return None
        elapsed = self.clock() - self.started
        return elapsed / self.done * (self.total - self.done)

    def text(self) -> str:
        """The state as one line, without the bar: label, done/total, note, time."""
        parts = [f"{self.label}: {self.done}/{self.total}"]
        if self.note:
            parts.append(self.note)
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA {format_seconds(eta)}")
        else:
            parts.append(f"{format_seconds(self.clock() - self.started)} elapsed")
        return ", ".join(parts)

    def update(self, done: int, note: str = "") -> None:
        """Record that ``done`` of ``total`` units are finished."""
        if not self.enabled or self.closed:
            return
        self.done = min(max(0, done), self.total)
        self.note = note
        if self.interactive:
            filled = BAR_WIDTH * self.done // self.total if self.total else BAR_WIDTH
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            self.stream.write(f"\r[{bar}] {self.text()}\x1b[K")
            self.stream.flush()
            return
        now = self.clock()
        # The first line waits one interval too: a short loop then writes only its end.
        due = (self.last_line if self.last_line is not None else self.started) + self.interval
        if now >= due and self.done < self.total:
            self._line()

    def close(self) -> None:
        """Write the final state (once) and end the bar's line."""
        if not self.enabled or self.closed:
            return
        self.closed = True
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
        else:
            self._line()

    def _line(self) -> None:
        self.last_line = self.clock()
        self.stream.write(self.text() + "\n")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
