"""Plots of a benchmark run directory (see :mod:`sphere_edit.bench.rundir` for its layout)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from ..evaluation.general import accuracy_keys
from .figures import new_figure, save_png
from .rundir import DIFFERENCES_PLOT, GENERAL_PLOT, METRICS_PLOT, BenchRunDir

CURVE_METRICS = ("efficacy", "generalization", "specificity")


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The run's summary with, per method, its checkpoints and HE series (edits → mean HE
    over the edited layers), read from the files the benchmark writes as it goes."""
    layout = BenchRunDir(run_dir)
    summary = layout.read_summary()
    config = layout.read_config()
    methods: dict[str, dict[str, Any]] = {}
    for spec in config["config"]["methods"]:
        method_dir = layout.method(spec)
        if not method_dir.started():
            continue  # not started yet
        energy: dict[int, list[float]] = {}
        for edits, _layer, value in method_dir.read_energy():
            energy.setdefault(edits, []).append(value)
        checkpoints = method_dir.read_checkpoints()
        methods[spec] = {
            "energy": {e: sum(v) / len(v) for e, v in sorted(energy.items())},
            "checkpoints": checkpoints,
            "summary": summary.get("methods", {}).get(spec),
            # Batches done and time per phase so far: what a run still in progress has.
            "progress": method_dir.read_progress(),
        }
    return {"summary": summary, "config": config, "methods": methods}


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write ``plots/metrics.png`` (metrics and HE against edits, a line per method) and
    ``plots/he_differences.png`` (consecutive differences, Figure 3 style)."""
    return plot_figures(read_run(run_dir), BenchRunDir(run_dir).plots)


def plot_figures(run: dict[str, Any], folder: Path) -> list[Path]:
    """The figures of a run as :func:`read_run` gives it (or of several runs merged into
    that shape) in ``folder``: ``metrics.png``, ``he_differences.png`` and, when measured,
    ``general.png``."""
    written = [_plot_curves(run, folder / METRICS_PLOT)]
    written.append(_plot_differences(run, folder / DIFFERENCES_PLOT))
    general = _plot_general(run, folder / GENERAL_PLOT)
    if general is not None:
        written.append(general)
    return written


def _legend(ax: Any) -> None:
    # A run with one checkpoint has no differences to draw, hence nothing to label.
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _plot_curves(run: dict[str, Any], path: Path) -> Path:
    pre = run["summary"]["pre_edit"]["metrics"]
    figure = new_figure(4.0 * (len(CURVE_METRICS) + 1), 3.4)
    axes = figure.subplots(1, len(CURVE_METRICS) + 1)
    for ax, metric in zip(axes, CURVE_METRICS, strict=False):
        for spec, data in run["methods"].items():
            xs = [c["edits"] for c in data["checkpoints"]]
            ys = [c["metrics"].get(metric) for c in data["checkpoints"]]
            ax.plot(xs, ys, marker="o", label=spec)
        if pre.get(metric) is not None:
            ax.axhline(pre[metric], color="grey", linestyle="--", label="pre-edit")
        ax.set_title(f"{metric} (cases edited so far)")
        ax.set_xlabel("edits")
        ax.set_ylim(-0.02, 1.02)
    ax = axes[-1]
    changes = {spec: energy_change(data["energy"]) for spec, data in run["methods"].items()}
    exponent = scale_exponent([v for series in changes.values() for v in series.values()])
    for spec, series in changes.items():
        ax.plot(list(series), [v / 10.0**exponent for v in series.values()], label=spec)
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.set_title("hyperspherical energy (mean over layers)")
    ax.set_xlabel("edits")
    scale = f" (×1e{exponent})" if exponent else ""
    ax.set_ylabel(f"HE − pre-edit HE{scale}")
    _legend(axes[0])
    save_png(figure, path)
    return path


def energy_change(energy: Mapping[int, float]) -> dict[int, float]:
    """Each HE value minus the pre-edit one (at 0 edits, else the first recorded)."""
    if not energy:
        return {}
    base = energy.get(0, next(iter(energy.values())))
    return {edits: value - base for edits, value in energy.items()}


def scale_exponent(values: Sequence[float]) -> int:
    """The power of ten that brings the largest magnitude into [1, 10) (0 for none), so
    that the axis shows plain numbers and says the scale in its label."""
    largest = max((abs(v) for v in values), default=0.0)
    return 0 if largest == 0 or not math.isfinite(largest) else math.floor(math.log10(largest))


def _plot_differences(run: dict[str, Any], path: Path) -> Path:
    figure = new_figure(4.0 * len(CURVE_METRICS), 3.4)
    axes = figure.subplots(1, len(CURVE_METRICS))
    # One scale for every ΔHE, said in the axis label rather than as an axis offset.
    steps = [b - a for d in run["methods"].values() for a, b in pairwise(d["energy"].values())]
    exponent = scale_exponent(steps)
    for ax, metric in zip(axes, CURVE_METRICS, strict=True):
        for spec, data in run["methods"].items():
            points = [
                (data["energy"].get(c["edits"]), c["metrics"].get(metric))
                for c in data["checkpoints"]
            ]
            points = [(h, m) for h, m in points if h is not None and m is not None]
            dh = [b[0] - a[0] for a, b in zip(points, points[1:], strict=False)]
            dh = [d / 10.0**exponent for d in dh]
            dm = [b[1] - a[1] for a, b in zip(points, points[1:], strict=False)]
            if not dh:
                continue
            ax.scatter(dh, dm, label=spec, s=18)
            fit = ((data["summary"] or {}).get("correlations") or {}).get(metric) or {}
            line = fit.get("difference_fit")
            if line and line.get("slope") is not None:
                lo, hi = min(dh), max(dh)
                fitted = [line["intercept"] + line["slope"] * x * 10.0**exponent for x in (lo, hi)]
                ax.plot([lo, hi], fitted)
        ax.set_title(f"Δ{metric} vs ΔHE between checkpoints")
        ax.ticklabel_format(axis="x", useOffset=False, style="plain")
        ax.set_xlabel(f"ΔHE (×1e{exponent})" if exponent else "ΔHE")
    _legend(axes[0])
    save_png(figure, path)
    return path


def _plot_general(run: dict[str, Any], path: Path) -> Path | None:
    """The benchmark's in-run general abilities, the pre-edit model at 0 edits."""
    pre = run["summary"]["pre_edit"].get("general", {}).get("summary", {})
    series = {
        spec: [{"edits": 0, "summary": pre}, *rows]
        for spec, data in run["methods"].items()
        if (rows := (data["summary"] or {}).get("general"))
    }
    return plot_general(series, path)


def plot_general(series: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path | None:
    """Each general-ability accuracy against edits, a line per series (a benchmark's
    methods, or one run's curve from ``sphere-edit general --edits``); the rows are
    ``{"edits": K, "summary": ...}`` as :func:`.general.evaluate_general` names them.
    ``None`` (and no file) when no row has a result."""
    keys = accuracy_keys([row.get("summary", {}) for rows in series.values() for row in rows])
    if not keys:
        return None
    figure = new_figure(3.6 * len(keys), 3.2)
    axes = figure.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=True):
        for label, rows in series.items():
            points = [(r["edits"], r.get("summary", {}).get(key)) for r in rows]
            points = [(x, y) for x, y in points if y is not None]
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
        ax.set_title(key)
        ax.set_xlabel("edits")
        ax.set_ylim(-0.02, 1.02)
    _legend(axes[0])
    save_png(figure, path)
    return path


def plot_collapse(run: Mapping[str, Any], path: Path) -> Path:
    """Per method, the headline metrics (cases edited so far) and HE (mean over the edited
    layers, right axis) against edits, the collapse point marked (the paper's Figure 2)."""
    from .analysis import collapse_point

    methods = list(run["methods"].items())
    figure = new_figure(4.4 * max(1, len(methods)), 3.4)
    axes = figure.subplots(1, max(1, len(methods)), squeeze=False)[0]
    for ax, (spec, data) in zip(axes, methods, strict=False):
        checkpoints = data["checkpoints"]
        xs = [c["edits"] for c in checkpoints]
        for metric in CURVE_METRICS:
            ax.plot(xs, [c["metrics"].get(metric) for c in checkpoints], marker="o", label=metric)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("edits")
        ax.set_title(spec)
        energy = data["energy"]
        twin = ax.twinx()
        twin.plot(list(energy), list(energy.values()), color="black", linewidth=1, label="HE")
        twin.ticklabel_format(axis="y", useOffset=False)
        twin.set_ylabel("HE (mean over layers)")
        point = collapse_point(checkpoints)
        if point is not None:
            ax.axvline(point, color="red", linestyle=":", label=f"collapse ({point})")
        _legend(ax)
    save_png(figure, path)
    return path


def plot_pooled_differences(pooled: Mapping[str, Any], path: Path) -> Path:
    """ΔHE against Δmetric between consecutive checkpoints, every method in one scatter
    per metric, with the pooled least-squares line (the paper's Figure 3);
    ``pooled`` is :func:`.analysis.pooled_difference_fits`'s."""
    figure = new_figure(4.0 * len(pooled), 3.4)
    axes = figure.subplots(1, len(pooled), squeeze=False)[0]
    steps = [p[0] for entry in pooled.values() for s in entry["points"].values() for p in s]
    exponent = scale_exponent(steps)
    for ax, (metric, entry) in zip(axes, pooled.items(), strict=True):
        for spec, points in entry["points"].items():
            if points:
                xs = [p[0] / 10.0**exponent for p in points]
                ax.scatter(xs, [p[1] for p in points], s=18, label=spec)
        fit = entry["fit"]
        if fit is not None and steps:
            lo, hi = min(steps), max(steps)
            ax.plot(
                [lo / 10.0**exponent, hi / 10.0**exponent],
                [fit.intercept + fit.slope * x for x in (lo, hi)],
                color="black",
                label=f"fit: r {fit.r:+.2f}, p {fit.p_value:.2g}",
            )
        ax.set_title(f"Δ{metric} vs ΔHE, all methods")
        ax.set_xlabel(f"ΔHE (×1e{exponent})" if exponent else "ΔHE")
        _legend(ax)
    save_png(figure, path)
    return path
