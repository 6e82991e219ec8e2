"""One batch of CounterFact edits, old code against new, side by side in one run.

``--n`` (default 100) CounterFact edits on SmolLM2 with AlphaEdit + SPHERE (preset layers),
everything but the (cached) key statistics: load, context templates, v*, keys, solve,
projection, HE, and the evaluation of those cases. Two sides, each in a subprocess of its
own (a fresh interpreter, the same data and statistics cache):

- ``base``: the code of commit 29a451e (a worktree of it, ``--base-src``), float32;
- ``new``: this tree's code with ``--precision`` (default auto), with the base's statistics
  and context-template recipes (256-token pieces, 10 new tokens), so that only speed and
  rounding differ;
- one more side per ``--fast OPTIMIZER:STEPS:LR[:ATTENTION]`` (repeatable): the new side
  with those v* settings (``VStarConfig.optimizer``, ``steps``, ``lr``, ``attention``),
  named options that change the edits.

Each side writes its journal; the edited models are then rebuilt from the journals and
scored by this tree's evaluation, so both are scored by the same code. Printed: the CPU's
bf16 flags, the fp32 and bf16 matmul peaks, the load average at start and end, each
phase's seconds, the speed-up and the differences of the metrics.

    python benchmarks/batch_speed.py --n 100 --out runs/batch_speed.json
    python benchmarks/batch_speed.py --n 100 --fast adam:25:0.5:eager --fast adam:13:2.0:eager
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASE_SRC = Path("/work/base/src")
METHOD = "alphaedit+sphere"
# The phases of a batch as both versions' sessions time them, in the order they run.
PHASES = ("context", "targets", "keys", "solve", "projection", "energy")
METRICS = ("rewrite_prob_success", "rewrite_top1", "paraphrase_top1", "paraphrase_prob_success")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- one side (runs in a subprocess, under either version of the package) ---------------


def _imports() -> dict[str, Any]:
    """The names one side needs, from whichever layout of the package is importable."""
    try:
        from sphere_edit.editing.build import build_session
        from sphere_edit.editing.requests import EditRequest
        from sphere_edit.model.loading import load_model

        new = True
    except ImportError:  # the flat layout of commit 29a451e
        from sphere_edit.editor import build_session  # type: ignore[no-redef]
        from sphere_edit.models import load_model  # type: ignore[no-redef]
        from sphere_edit.requests import EditRequest  # type: ignore[no-redef]

        new = False
    return {"build": build_session, "load": load_model, "request": EditRequest, "new": new}


def fast_overrides(settings: str) -> dict[str, Any]:
    """``OPTIMIZER:STEPS:LR[:ATTENTION]`` as ``VStarConfig`` fields."""
    fields = settings.split(":")
    if len(fields) not in (3, 4):
        raise SystemExit(f"--fast: expected OPTIMIZER:STEPS:LR[:ATTENTION], got {settings!r}")
    overrides: dict[str, Any] = {"optimizer": fields[0], "steps": int(fields[1])}
    overrides["lr"] = float(fields[2])
    if len(fields) == 4:
        overrides["attention"] = fields[3]
    return overrides


def run_side(args: argparse.Namespace) -> None:
    """Edit the first ``--n`` cases in one batch into ``--run-dir``; print the phases as JSON."""
    names = _imports()
    records = json.loads((args.data / "counterfact" / "train.json").read_text())[: args.n]
    requests = [names["request"].from_dict(r, index=i) for i, r in enumerate(records)]
    phases: dict[str, float] = {}
    start = time.perf_counter()
    loaded = names["load"](args.model)
    phases["load"] = time.perf_counter() - start
    start = time.perf_counter()
    # The new side keeps the base's statistics and template recipes (the fidelity issue's
    # new defaults change the edits, not the speed), so the two sides edit alike.
    extra: dict[str, Any] = (
        {"precision": args.precision, "stats_pieces": "256", "template_tokens": 10}
        if names["new"]
        else {}
    )
    if args.fast:
        extra["target_overrides"] = fast_overrides(args.fast[0])
    session = names["build"](
        loaded, METHOD, corpus=str(args.data / "corpus" / "wiki_corpus.jsonl"),
        stats_tokens=args.stats_tokens, run_dir=args.run_dir, progress=False,
        log=lambda _message: None, **extra,
    )  # fmt: skip
    phases["statistics (cached, not counted)"] = time.perf_counter() - start
    start = time.perf_counter()
    session.context_templates()
    phases["templates"] = time.perf_counter() - start
    result = session.apply(requests)
    for phase in PHASES:
        phases[phase] = float(result.timings.get(phase, 0.0))
    steps = [int(s) for s in result.target_steps]
    print(
        json.dumps(
            {
                "phases": phases,
                "mean_steps": sum(steps) / len(steps),
                "bf16": bool(session.target.bf16),
                "mean_target_loss": sum(result.target_loss) / len(result.target_loss),
            }
        )
    )


# -- the comparison (this tree's code) ---------------------------------------------------


def side(name: str, src: Path, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [
        sys.executable, __file__, "--side", name, "--n", str(args.n), "--data", str(args.data),
        "--model", args.model, "--stats-tokens", str(args.stats_tokens),
        "--precision", args.precision if name != "base" else "fp32", "--run-dir", str(run_dir),
    ] + (["--fast", name] if name not in ("base", "new") else [])  # fmt: skip
    print(f"[{time.strftime('%H:%M:%S')}] {name}: PYTHONPATH={src}", flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} side failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def score(run_dir: Path, args: argparse.Namespace) -> tuple[dict[str, float], float]:
    """The journal's model, scored on the edited cases; (metrics, seconds)."""
    from sphere_edit.editing.runs import load_run_model
    from sphere_edit.evaluation.data import load_cases
    from sphere_edit.evaluation.metrics import aggregate, evaluate_cases

    cases = load_cases(args.data / "counterfact" / "train.json", limit=args.n).cases
    loaded, _index = load_run_model(run_dir, model=args.model)
    start = time.perf_counter()
    results = evaluate_cases(loaded.model, loaded.tokenizer, cases, batch_size=64)
    seconds = time.perf_counter() - start
    summary = aggregate(results)
    return {m: float(summary[m]) for m in METRICS}, seconds


def compare(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from _output import machine_facts

    report: dict[str, Any] = {
        "n": args.n,
        "threads": torch.get_num_threads(),
        **machine_facts(),
        "load_average_start": load_average(),
    }
    print(json.dumps(report, indent=2), flush=True)
    sides: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("base", args.base_src), ("new", REPO / "src")]
        runs += [(settings, REPO / "src") for settings in args.fast or []]
        for name, src in runs:
            run_dir = Path(tmp) / name
            sides[name] = side(name, src, args, run_dir)
            metrics, seconds = score(run_dir, args)
            sides[name]["phases"]["evaluation"] = seconds
            sides[name]["metrics"] = metrics
            counted = {k: v for k, v in sides[name]["phases"].items() if "not counted" not in k}
            sides[name]["total_seconds"] = sum(counted.values())
            print(f"{name}: {json.dumps(sides[name])}", flush=True)
    report["sides"] = sides
    report["load_average_end"] = load_average()
    base, new = sides["base"], sides["new"]
    report["speedup"] = base["total_seconds"] / new["total_seconds"]
    report["speedup_vstar"] = base["phases"]["targets"] / new["phases"]["targets"]
    report["metric_difference_new_minus_base"] = {
        m: new["metrics"][m] - base["metrics"][m] for m in METRICS
    }
    for settings in args.fast or []:
        fast = sides[settings]
        report[f"speedup {settings}"] = base["total_seconds"] / fast["total_seconds"]
        report[f"speedup_vstar {settings}"] = base["phases"]["targets"] / fast["phases"]["targets"]
        report[f"metric_difference {settings} minus base"] = {
            m: fast["metrics"][m] - base["metrics"][m] for m in METRICS
        }
    return report


def print_table(report: dict[str, Any]) -> None:
    sides = report["sides"]
    base = sides["base"]
    others = [name for name in sides if name != "base"]
    head = "".join(f"{chr(ord('A') + i):>10}{'×':>7}" for i in range(len(others)))
    print(f"\n{'phase':<34}{'base 29a451e':>14}{head}")
    for phase in base["phases"]:
        b = base["phases"][phase]
        cells = ""
        for name in others:
            n = sides[name]["phases"].get(phase, 0.0)
            cells += f"{n:>10.2f}" + (f"{b / n:>7.1f}" if n > 0 else f"{'':>7}")
        print(f"{phase:<34}{b:>14.2f}{cells}")
    totals = [sides[n]["total_seconds"] for n in others]
    cells = "".join(f"{t:>10.2f}{base['total_seconds'] / t:>7.1f}" for t in totals)
    print(f"{'total (counted)':<34}{base['total_seconds']:>14.2f}{cells}")
    cells = "".join(f"{sides[n]['mean_steps']:>10.2f}{'':>7}" for n in others)
    print(f"{'mean v* steps':<34}{base['mean_steps']:>14.2f}{cells}")
    for metric in METRICS:
        b = base["metrics"][metric]
        cells = "".join(
            f"{sides[n]['metrics'][metric]:>10.3f}{sides[n]['metrics'][metric] - b:>+7.3f}"
            for n in others
        )
        print(f"{metric:<34}{b:>14.3f}{cells}")
    print(f"precision of the new side: {'bf16' if sides['new']['bf16'] else 'fp32'}")
    for i, name in enumerate(others):
        print(f"{chr(ord('A') + i)}: {name} (v* optimizer:steps:lr[:attention] for a fast side)")
    print(f"load average: start {report['load_average_start']}, end {report['load_average_end']}")


def main() -> None:
    default_data = Path(os.environ.get("SPHERE_EDIT_DATA", REPO.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--data", type=Path, default=default_data)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--stats-tokens", type=int, default=100_000)
    parser.add_argument("--precision", default="auto", help="the new side's: auto, fp32, bf16")
    parser.add_argument("--base-src", type=Path, default=BASE_SRC)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--fast",
        action="append",
        help="also run the new code with these v* settings, OPTIMIZER:STEPS:LR[:ATTENTION]"
        " (repeatable)",
    )
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for settings in args.fast or []:
        fast_overrides(settings)  # a malformed side fails here, before any side runs
    if args.side is not None:
        run_side(args)
        return
    report = compare(args)
    print_table(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
