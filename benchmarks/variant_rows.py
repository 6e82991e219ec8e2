"""One table row per method of finished benchmark runs, with the columns issue 20 asks of
every variant: Eff, Gen, Spe, Flu, the three P(new) > P(old) columns, GSM8K, the HE change
and the time.

    python benchmarks/variant_rows.py RUN_DIR[=GENERAL_JSON] ... [--out rows.json]

RUN_DIR is a ``sphere-edit bench`` directory (its ``summary.json``); GENERAL_JSON, when
given, is a ``sphere-edit general --out`` file whose last point's GSM8K goes in the row.
The time is the summed phase times of ``progress.json`` (all resumed processes). Two HE
columns: the mean over edited layers of (final − initial) HE, as ``sphere-edit
sweep`` reports it, and the largest change of one layer in one batch (``batches.jsonl``),
where the outlier batches of issue 20 show.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sphere_edit.bench.rundir import BenchRunDir, MethodDir, read_jsonl
from sphere_edit.bench.sweep import point_row

P_COLUMNS = ("rewrite_prob_success", "paraphrase_prob_success", "neighborhood_prob_success")


def largest_batch_change(folder: MethodDir) -> tuple[float, int, str] | None:
    """(change, batch, layer) of the largest |HE change| of one layer in one batch."""
    best = None
    for batch in read_jsonl(folder.batches):
        for layer, change in batch.get("energy_change", {}).items():
            if best is None or abs(change) > abs(best[0]):
                best = (float(change), int(batch["batch"]), layer)
    return best


def phase_seconds(folder: MethodDir) -> float | None:
    """The method's summed phase times (``progress.json``), which add up over resumed
    processes where ``wall_seconds`` is the last process's alone."""
    timings = folder.read_progress().get("timings")
    return float(sum(timings.values())) if timings else None


def gsm8k(path: Path | None) -> float | None:
    if path is None:
        return None
    points = json.loads(path.read_text())["points"]
    return points[-1]["summary"].get("gsm8k_acc") if points else None


def method_rows(run_dir: Path, general: Path | None) -> list[dict[str, Any]]:
    layout = BenchRunDir(run_dir)
    summary = json.loads(layout.summary.read_text())
    rows = []
    for spec, data in summary["methods"].items():
        folder = layout.method(spec)
        row = point_row(spec, summary)
        metrics = data["final"]["metrics"]
        row.update({name: metrics.get(name) for name in ("fluency", *P_COLUMNS)})
        row["gsm8k"] = gsm8k(general)
        row["largest_batch_he_change"] = largest_batch_change(folder)
        row["phase_seconds"] = phase_seconds(folder)
        row["run_dir"] = str(run_dir)
        rows.append(row)
    return rows


def _cell(value: Any, scale: float = 1.0, spec: str = ".2f") -> str:
    return "–" if value is None else format(value * scale, spec)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| run | method | Eff. | Gen. | Spe. | Flu. | rewrite / paraphrase / neighbourhood P> "
        "| GSM8K | mean ΔHE ×1e4 | largest batch ΔHE ×1e4 (batch, layer) | phase time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        p = " / ".join(_cell(row[name], 100, ".1f") for name in P_COLUMNS)
        largest = row["largest_batch_he_change"]
        big = "–" if largest is None else f"{largest[0] * 1e4:.2f} ({largest[1]}, {largest[2]})"
        lines.append(
            f"| {Path(row['run_dir']).name} | {row['spec']} | {_cell(row['efficacy'], 100)} "
            f"| {_cell(row['generalization'], 100)} | {_cell(row['specificity'], 100)} "
            f"| {_cell(row['fluency'], 1, '.3f')} | {p} | {_cell(row['gsm8k'], 1, '.3f')} "
            f"| {_cell(row['he_change'], 1e4)} | {big} | {_cell(row['phase_seconds'], 1, '.0f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="RUN_DIR or RUN_DIR=GENERAL_JSON")
    parser.add_argument("--out", type=Path, help="write the rows here as JSON")
    args = parser.parse_args()
    rows = []
    for item in args.runs:
        run, _, general = item.partition("=")
        run_dir = Path(run)
        if not (run_dir / "summary.json").is_file():
            raise SystemExit(f"error: {run_dir}: no summary.json; give a finished bench run")
        general_path = Path(general) if general else None
        if general_path is not None and not general_path.is_file():
            raise SystemExit(f"error: {general_path}: not a file; give a general --out JSON")
        found = method_rows(run_dir, general_path)
        if not found:
            print(f"note: {run_dir}: no method has finished; left out", file=sys.stderr)
        rows.extend(found)
    print(markdown(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
