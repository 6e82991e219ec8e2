"""A grid of SPHERE options on one data set: one benchmark run per grid point.

Each grid point is a method spec with ``:name=value`` options (``MethodSpec``), run by
:class:`~.runner.Benchmark` into its own run directory under the sweep directory; the
first point's pre-edit results and its first batch's v* are reused by the others. A
finished point is skipped on ``resume`` and an interrupted one continues where it stopped.
``sweep.json`` names the sweep, ``sweep.jsonl`` holds one row per finished point,
``sweep.md`` the table and ``sweep.png`` each metric against each grid axis (mean over the
other axes).
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..common.fileio import RUN_LOCK
from ..editing.build import SPHERE_OPTIONS, MethodSpec
from ..model.loading import LoadedModel
from .figures import new_figure, save_png
from .rundir import write_jsonl
from .runner import BenchConfig, Benchmark, FirstTargets

SWEEP_FILE = "sweep.json"
ROWS_FILE = "sweep.jsonl"
TABLE_FILE = "sweep.md"
PLOT_FILE = "sweep.png"
COLUMNS = ("efficacy", "generalization", "specificity")


class SweepError(ValueError):
    """A sweep's options or directory cannot be used; the message names the fix."""


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["alpha=0.3,0.5", "eta=0.5"]`` → ``{"alpha": ["0.3", "0.5"], "eta": ["0.5"]}``."""
    grid: dict[str, list[str]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in SPHERE_OPTIONS or not values.strip():
            raise SweepError(
                f"grid: cannot parse {item!r}; write name=v1,v2 with a name among "
                f"{', '.join(SPHERE_OPTIONS)}"
            )
        if name in grid:
            raise SweepError(f"grid: {name} is given twice; list all its values in one --grid")
        grid[name] = [v.strip() for v in values.split(",") if v.strip()]
    return grid


def grid_specs(method: str, grid: Mapping[str, Sequence[str]]) -> list[str]:
    """One method spec per grid point (the cartesian product, in the grid's order)."""
    base = MethodSpec.parse(method)
    if not base.sphere:
        raise SweepError(f"method: {method!r} has no SPHERE suffix; e.g. {method}+sphere")
    if base.options:
        raise SweepError(f"method: give {method!r} without ':' options; put them in --grid")
    names = list(grid)
    specs = []
    for values in itertools.product(*(grid[n] for n in names)):
        text = str(base) + "".join(f":{n}={v}" for n, v in zip(names, values, strict=True))
        specs.append(str(MethodSpec.parse(text)))  # checks every value
    return specs


def point_row(spec: str, summary: Mapping[str, Any]) -> dict[str, Any]:
    """A table row from a finished benchmark's summary of ``spec``."""
    data = summary["methods"][spec]
    metrics = data["final"]["metrics"]
    initial, final = data["energy_initial"], data["energy_final"]
    changes = [final[k] - initial[k] for k in final if k in initial]
    return {
        "spec": spec,
        **dict(MethodSpec.parse(spec).options),
        **{name: metrics.get(name) for name in COLUMNS},
        "he_change": statistics.fmean(changes) if changes else None,
        "seconds": data.get("wall_seconds"),
    }


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table: the spec, Eff, Gen, Spe, mean HE change, time."""
    lines = [
        "| spec | Eff | Gen | Spe | mean ΔHE | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [_cell(row.get(n), ".3f") for n in COLUMNS]
        lines.append(
            f"| {row['spec']} | {' | '.join(cells)} | {_cell(row['he_change'], '.3g')} "
            f"| {_cell(row['seconds'], '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def _cell(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def plot_sweep(rows: Sequence[Mapping[str, Any]], axes: Sequence[str], path: Path) -> Path:
    """Each metric (and the mean HE change) against each grid axis, averaged over the
    other axes."""
    metrics = (*COLUMNS, "he_change")
    figure = new_figure(3.6 * len(metrics), 3.0 * max(len(axes), 1))
    grid = figure.subplots(max(len(axes), 1), len(metrics), squeeze=False)
    for i, axis in enumerate(axes):
        values = sorted({row[axis] for row in rows}, key=lambda v: (str(type(v)), v))
        for j, metric in enumerate(metrics):
            ys = []
            for value in values:
                points = [r[metric] for r in rows if r[axis] == value and r[metric] is not None]
                ys.append(statistics.fmean(points) if points else float("nan"))
            ax = grid[i][j]
            ax.plot([str(v) for v in values], ys, marker="o")
            ax.set_xlabel(axis)
            ax.set_title(metric)
    save_png(figure, path)
    return path


def run_sweep(
    config: BenchConfig,
    method: str,
    grid: Mapping[str, Sequence[str]],
    out: str | Path,
    *,
    resume: bool = False,
    loaded: LoadedModel | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every grid point of ``method`` with ``config``'s data set and schedule (its
    ``methods`` are replaced by the point's spec); return the rows of the table."""
    out = Path(out)
    specs = grid_specs(method, grid)
    described = {"method": method, "grid": {k: list(v) for k, v in grid.items()}}
    described["config"] = {k: v for k, v in asdict(config).items() if k != "methods"}
    described["config"] = json.loads(json.dumps(described["config"]))
    sweep_file = out / SWEEP_FILE
    if resume:
        if not sweep_file.exists():
            raise SweepError(f"--resume: {out} holds no sweep to resume")
        if json.loads(sweep_file.read_text()) != described:
            raise SweepError(f"--resume: {out} was a sweep with other options; use a new folder")
    elif out.exists() and any(p.name != RUN_LOCK for p in out.iterdir()):
        raise SweepError(f"output: {out} is not empty; choose a new folder or add --resume")
    out.mkdir(parents=True, exist_ok=True)
    sweep_file.write_text(json.dumps(described, indent=2) + "\n")
    rows: list[dict[str, Any]] = []
    first: Path | None = None
    # Every point edits the same first batch of the same base model with the same v*
    # settings (the grid varies SPHERE options only), so its v* is computed once.
    first_targets: FirstTargets = {}
    for i, spec in enumerate(specs):
        run_dir = out / f"point-{i:03d}"
        log(f"sweep point {i + 1}/{len(specs)}: {spec}")
        bench = Benchmark(
            replace(config, methods=(spec,)),
            run_dir,
            log=log,
            progress=progress,
            loaded=loaded,
            resume=resume and run_dir.exists(),
            pre_edit_from=first if first is not None and not run_dir.exists() else None,
            first_targets=first_targets,
        )
        summary = bench.run()
        first = first or run_dir
        rows.append(point_row(spec, summary))
        write_jsonl(out / ROWS_FILE, rows)
    (out / TABLE_FILE).write_text(format_table(rows))
    plot_sweep(rows, list(grid), out / PLOT_FILE)
    return rows
