"""Fault injection for the crash tests: ``SPHERE_EDIT_FAULT=<point>:<count>`` kills the
process with SIGKILL the ``count``-th time it reaches the named point (several specs may be
given, separated by commas). Without the variable every point is a dictionary lookup and
nothing else.

Points (see ``docs/reliability.md``):

- ``vstar``: every Adam step of the v* optimisation (``targets.compute_vstar``);
- ``layer``: after one layer's update was added to the weights, before the next layer
  (``routes.spread``); the batch is in memory only;
- ``journal-tensors``: the batch's delta file is written, its JSON and the index are not;
- ``journal-index``: both batch files are written, the index does not name them yet;
- ``atomic-rename``: inside every atomic write, after fsync and before the rename (a
  temporary file is left behind);
- ``bench-record``: a batch is journaled, the benchmark's record of it is not written.
"""

from __future__ import annotations

import os
import signal

ENV = "SPHERE_EDIT_FAULT"
POINTS = ("vstar", "layer", "journal-tensors", "journal-index", "atomic-rename", "bench-record")

_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Kill this process here if ``$SPHERE_EDIT_FAULT`` asks for it."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        point, _, count = item.strip().partition(":")
        if point != name:
            continue
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] == int(count or 1):
            os.kill(os.getpid(), signal.SIGKILL)
