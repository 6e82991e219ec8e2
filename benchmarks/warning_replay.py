"""The HE early-warning rule replayed on finished runs over a grid of its settings: how
many collapses it flags ahead, with what lead, and how many false alarms it raises.

    python benchmarks/warning_replay.py RUN_DIR ... [--k 5,10,20] [--warmup 1,2,3,5]
        [--horizon 2] [--not-collapse ultraedit] [--out replay.json]

Each RUN_DIR is a ``sphere-edit bench`` directory; every started method in it counts.
A collapse is :func:`~sphere_edit.bench.analysis.collapse_point` (efficacy of the edits
so far below half its first checkpoint's). A steady decline crosses that line too: the
methods named by ``--not-collapse`` (a substring of the spec) are counted as runs without
a collapse, and the table says so. False alarms are counted as batches with at least one
alarm, earlier than ``horizon`` batches before the collapse (any batch in a run without
one); alarms after the collapse are not counted (the model is already broken).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sphere_edit.bench.analysis import run_warning_evaluation


def _numbers(text: str, kind: type) -> list[Any]:
    return [kind(v) for v in text.split(",") if v.strip()]


def replay(
    runs: list[Path], k: float, warmup: int, horizon: int, not_collapse: list[str]
) -> dict[str, Any]:
    """One grid point over every method of ``runs``."""
    flagged, leads, collapses, false, batches, per_run = 0, [], 0, 0, 0, []
    for run in runs:
        results = run_warning_evaluation(run, k=k, warmup=warmup, horizon=horizon)
        for spec, r in results.items():
            collapse = r["collapse_batch"]
            if any(name in spec for name in not_collapse):
                collapse = None
            alarm_batches = sorted({a["batch"] for a in r["alarms"]})
            if collapse is None:
                wrong = alarm_batches
                batches += r["batches"]
                lead = None
            else:
                collapses += 1
                wrong = [b for b in alarm_batches if b < collapse - horizon]
                ahead = [b for b in alarm_batches if 0 <= collapse - b <= horizon]
                lead = collapse - ahead[0] if ahead else None
                if ahead:
                    flagged += 1
                    leads.append(lead)
                batches += collapse
            false += len(wrong)
            per_run.append(
                {"run": run.name, "method": spec, "batches": r["batches"],
                 "collapse_batch": collapse, "lead": lead, "false_alarm_batches": wrong}
            )  # fmt: skip
    return {
        "k": k, "warmup": warmup, "horizon": horizon, "collapses": collapses,
        "flagged": flagged, "leads": leads, "false_alarm_batches": false,
        "batches_watched": batches, "runs": per_run,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--k", default="5,10,20", help="comma-separated k values")
    parser.add_argument("--warmup", default="1,2,3,5", help="comma-separated warm-ups")
    parser.add_argument("--horizon", type=int, default=2, help="batches ahead that count")
    parser.add_argument("--not-collapse", default="", help="comma-separated spec parts")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    for run in args.runs:
        if not (run / "config.json").is_file():
            raise SystemExit(f"error: {run}: no config.json; give a bench run directory")
    not_collapse = [v.strip() for v in args.not_collapse.split(",") if v.strip()]
    points = [
        replay(args.runs, k, warmup, args.horizon, not_collapse)
        for warmup in _numbers(args.warmup, int)
        for k in _numbers(args.k, float)
    ]
    print(f"{len(args.runs)} runs; horizon {args.horizon} batches; not collapses: {not_collapse}")
    print("| warm-up | k | collapses flagged | leads (batches) | false-alarm batches |")
    print("| --- | --- | --- | --- | --- |")
    for p in points:
        print(
            f"| {p['warmup']} | {p['k']:g} | {p['flagged']} of {p['collapses']} "
            f"| {', '.join(map(str, p['leads'])) or '–'} "
            f"| {p['false_alarm_batches']} of {p['batches_watched']} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(points, indent=2))


if __name__ == "__main__":
    main()
