"""The HE early-warning rule replayed on finished runs over a grid of its settings: how
many collapses it flags ahead, with what lead, and how many false alarms it raises.

    python benchmarks/warning_replay.py RUN_DIR ... [--k 5,10,20] [--warmup 1,2,3,5]
        [--horizon 2] [--out replay.json]

Each RUN_DIR is a ``sphere-edit bench`` directory; every started method in it counts.
Collapse, flagged, lead and false alarm are :func:`~sphere_edit.bench.analysis.
warning_evaluation`'s; false alarms are counted here as batches with at least one (its
``false_alarm_batches``), against the batches watched: up to the collapse, or all of a
run without one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sphere_edit.bench.analysis import run_warning_evaluation


def _numbers(text: str, kind: type) -> list[Any]:
    return [kind(v) for v in text.split(",") if v.strip()]


def replay(runs: list[Path], k: float, warmup: int, horizon: int) -> dict[str, Any]:
    """One grid point over every method of ``runs``."""
    per_run = []
    for run in runs:
        results = run_warning_evaluation(run, k=k, warmup=warmup, horizon=horizon)
        for spec, r in results.items():
            per_run.append(
                {"run": run.name, "method": spec, "batches": r["batches"],
                 "collapse_batch": r["collapse_batch"],
                 "lead": r["first_lead"] if r["flagged"] else None,
                 "false_alarm_batches": r["false_alarm_batches"]}
            )  # fmt: skip
    collapsed = [r for r in per_run if r["collapse_batch"] is not None]
    return {
        "k": k, "warmup": warmup, "horizon": horizon, "collapses": len(collapsed),
        "flagged": sum(r["lead"] is not None for r in collapsed),
        "leads": [r["lead"] for r in collapsed if r["lead"] is not None],
        "false_alarm_batches": sum(len(r["false_alarm_batches"]) for r in per_run),
        "batches_watched": sum(
            r["batches"] if r["collapse_batch"] is None else r["collapse_batch"] for r in per_run
        ),
        "runs": per_run,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--k", default="5,10,20", help="comma-separated k values")
    parser.add_argument("--warmup", default="1,2,3,5", help="comma-separated warm-ups")
    parser.add_argument("--horizon", type=int, default=2, help="batches ahead that count")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    for run in args.runs:
        if not (run / "config.json").is_file():
            raise SystemExit(f"error: {run}: no config.json; give a bench run directory")
    points = [
        replay(args.runs, k, warmup, args.horizon)
        for warmup in _numbers(args.warmup, int)
        for k in _numbers(args.k, float)
    ]
    print(f"{len(args.runs)} runs; horizon {args.horizon} batches")
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
