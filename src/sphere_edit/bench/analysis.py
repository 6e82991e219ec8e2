"""Analyses of finished (or running) benchmark runs for the long sequential studies:
bootstrap intervals over cases, the collapse point with Spearman ρ before and after it,
the pooled fit of consecutive differences, the HE early-warning rule's hits and false
alarms, and the spread of runs that differ only in case order.

Every function reads what :func:`sphere_edit.bench.plots.read_run` gives (or the run
directory's files) and writes nothing.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from ..evaluation.metrics import HEADLINES, spearman
from ..sphere.warning import DEFAULT_K, DEFAULT_WARMUP, EnergyWarning
from .rundir import BenchRunDir, read_jsonl

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
BOOTSTRAP_LEVEL = 0.95
COLLAPSE_METRICS = ("efficacy", "generalization", "specificity")
# Batches after an alarm within which a collapse makes it a hit (else a false alarm).
DEFAULT_HORIZON = 2
NO_COLLAPSE = "no collapse"
TOO_FEW = "too few checkpoints"


# -- bootstrap ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """A mean and its percentile-bootstrap interval over ``n`` values."""

    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}


def bootstrap_interval(
    values: Sequence[float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = BOOTSTRAP_LEVEL,
) -> Interval:
    """The mean of ``values`` and the percentile bootstrap interval of it: the
    ``(1 ± level) / 2`` quantiles of the means of ``resamples`` resamples with
    replacement, drawn from a generator seeded with ``seed`` (the same values give the
    same interval)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("bootstrap: no values to resample")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap: level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    # Chunks keep the index array small for runs of thousands of cases.
    chunk = max(1, 2_000_000 // data.size)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        picks = rng.integers(0, data.size, size=(stop - start, data.size))
        means[start:stop] = data[picks].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(data.mean()), float(low), float(high), int(data.size))


def _case_values(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """Each case's value of ``key`` (a per-case key, or a headline name resolved as
    :func:`~sphere_edit.evaluation.metrics.aggregate` resolves it); cases without one
    are left out, as the aggregate leaves them out."""
    for source in HEADLINES.get(key, (key,)):
        values = [float(r[source]) for r in rows if isinstance(r.get(source), (bool, int, float))]
        if values:
            return values
    return []


def case_intervals(
    rows: Sequence[Mapping[str, Any]], keys: Sequence[str], **options: Any
) -> dict[str, dict[str, Any]]:
    """A bootstrap interval (as a dict) per key that the cases have values of."""
    out = {}
    for key in keys:
        values = _case_values(rows, key)
        if values:
            out[key] = bootstrap_interval(values, **options).to_dict()
    return out


def format_interval(entry: Mapping[str, Any] | None) -> str:
    """A cell ×100 as in the paper's tables: "74.00 [71.90, 76.10]"; "–" for none."""
    if not entry:
        return "–"
    return f"{100 * entry['mean']:.2f} [{100 * entry['low']:.2f}, {100 * entry['high']:.2f}]"


def run_intervals(run_dir: str | Path, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per row of the run ("pre-edit" and each finished method): its intervals, taken
    from the method's summary.json where the run stored them, else computed from its
    cases file (runs written before intervals were stored)."""
    layout = BenchRunDir(run_dir)
    out = {}
    if layout.pre_edit.cases.exists():
        out["pre-edit"] = case_intervals(read_jsonl(layout.pre_edit.cases), keys)
    for spec in layout.methods():
        folder = layout.method(spec)
        if not folder.summary.exists():
            continue  # in progress: no final-model cases yet
        stored = folder.read_summary().get("intervals")
        out[spec] = stored if stored is not None else case_intervals(read_jsonl(folder.cases), keys)
    return out


# -- collapse -----------------------------------------------------------------------------


def collapse_point(
    checkpoints: Sequence[Mapping[str, Any]], metric: str = "efficacy"
) -> int | None:
    """The edits of the first checkpoint whose ``metric`` falls below half its value at
    the first checkpoint; None when it never does (or the first value is missing)."""
    values = [(c["edits"], c["metrics"].get(metric)) for c in checkpoints]
    if not values or values[0][1] is None:
        return None
    half = values[0][1] / 2
    return next((edits for edits, v in values if v is not None and v < half), None)


def _rho(he: Sequence[float], series: Sequence[float]) -> dict[str, Any]:
    if len(he) < 3:
        return {"spearman": None, "n": len(he), "reason": TOO_FEW}
    value = spearman(he, series)
    if math.isnan(value):
        return {"spearman": None, "n": len(he), "reason": "constant series"}
    return {"spearman": value, "n": len(he)}


def collapse_correlations(
    checkpoints: Sequence[Mapping[str, Any]], energy: Mapping[int, float]
) -> dict[str, Any]:
    """The collapse point and, per headline metric, Spearman ρ between HE (mean over the
    edited layers, ``energy``: edits → HE) and the metric over the checkpoints before it
    and over those from it on (the paper's Figure 2). Without a collapse both sides say
    :data:`NO_COLLAPSE`; a side with fewer than 3 checkpoints says :data:`TOO_FEW`."""
    point = collapse_point(checkpoints)
    out: dict[str, Any] = {"collapse": point, "before": {}, "after": {}}
    for metric in COLLAPSE_METRICS:
        rows = [
            (energy[c["edits"]], c["metrics"][metric], c["edits"])
            for c in checkpoints
            if c["edits"] in energy and c["metrics"].get(metric) is not None
        ]
        if point is None:
            out["before"][metric] = out["after"][metric] = {"spearman": None, "reason": NO_COLLAPSE}
            continue
        for side, chosen in (
            ("before", [r for r in rows if r[2] < point]),
            ("after", [r for r in rows if r[2] >= point]),
        ):
            out[side][metric] = _rho([r[0] for r in chosen], [r[1] for r in chosen])
    return out


def format_rho(entry: Mapping[str, Any]) -> str:
    value = entry.get("spearman")
    return f"{value:+.2f}" if value is not None else f"– ({entry.get('reason', 'none')})"


# -- consecutive differences, all methods pooled -------------------------------------------


@dataclass(frozen=True)
class PooledFit:
    """Least-squares line through the pooled (ΔHE, Δmetric) points, with Pearson's r and
    the two-sided p-value of r = 0 (t test with n − 2 degrees of freedom)."""

    slope: float
    intercept: float
    r: float
    p_value: float
    n: int


def difference_points(
    checkpoints: Sequence[Mapping[str, Any]], energy: Mapping[int, float], metric: str
) -> list[tuple[float, float]]:
    """(ΔHE, Δmetric) between consecutive checkpoints that have both values."""
    points = [
        (energy[c["edits"]], c["metrics"][metric])
        for c in checkpoints
        if c["edits"] in energy and c["metrics"].get(metric) is not None
    ]
    return [(b[0] - a[0], b[1] - a[1]) for a, b in pairwise(points)]


def pooled_fit(points: Sequence[tuple[float, float]]) -> PooledFit | None:
    """The fit of ``points``; None with fewer than 3 or when every ΔHE is equal."""
    if len(points) < 3:
        return None
    dx = np.array([p[0] for p in points], dtype=np.float64)
    dy = np.array([p[1] for p in points], dtype=np.float64)
    cx, cy = dx - dx.mean(), dy - dy.mean()
    sxx, syy = float(cx @ cx), float(cy @ cy)
    if sxx == 0:
        return None
    slope = float(cx @ cy) / sxx
    r = float(cx @ cy) / math.sqrt(sxx * syy) if syy > 0 else math.nan
    return PooledFit(slope, float(dy.mean() - slope * dx.mean()), r, _p_value(r, len(dx)), len(dx))


def _p_value(r: float, n: int) -> float:
    """Two-sided p of Pearson's r under independence: P(|T| ≥ |t|) for Student's t with
    n − 2 degrees of freedom, which is the regularised incomplete beta I_x(df/2, 1/2)
    at x = df / (df + t²)."""
    if math.isnan(r):
        return math.nan
    df = n - 2
    if abs(r) >= 1:
        return 0.0
    t2 = r * r * df / (1 - r * r)
    return _incomplete_beta(df / 2, 0.5, df / (df + t2))


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) by its continued fraction
    (Lentz's method), using the symmetry I_x(a, b) = 1 − I_{1−x}(b, a) where the
    fraction converges slowly."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _incomplete_beta(b, a, 1 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(log_front + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f


def pooled_difference_fits(run: Mapping[str, Any]) -> dict[str, Any]:
    """Per headline metric: every method's (ΔHE, Δmetric) points (method → points) and
    the fit of all of them together (None when too few), the paper's Figure 3."""
    out = {}
    for metric in COLLAPSE_METRICS:
        points = {
            spec: difference_points(data["checkpoints"], data["energy"], metric)
            for spec, data in run["methods"].items()
        }
        fit = pooled_fit([p for series in points.values() for p in series])
        out[metric] = {"points": points, "fit": fit}
    return out


# -- the early-warning rule on a run ------------------------------------------------------


def layer_changes(rows: Sequence[tuple[int, int, float]]) -> list[tuple[int, dict[int, float]]]:
    """he.csv's (edits, layer, energy) rows as one (edits, layer → HE change) per batch,
    in order, each change against the layer's previous row (the pre-edit one first)."""
    by_edits: dict[int, dict[int, float]] = {}
    for edits, layer, value in rows:
        by_edits.setdefault(edits, {})[layer] = value
    ordered = sorted(by_edits.items())
    return [
        (edits, {layer: now[layer] - before[layer] for layer in now if layer in before})
        for (_, before), (edits, now) in pairwise(ordered)
    ]


def warning_evaluation(
    energy_rows: Sequence[tuple[int, int, float]],
    checkpoints: Sequence[Mapping[str, Any]],
    *,
    k: float = DEFAULT_K,
    warmup: int = DEFAULT_WARMUP,
    horizon: int = DEFAULT_HORIZON,
) -> dict[str, Any]:
    """The rule of :class:`~sphere_edit.sphere.warning.EnergyWarning` replayed on a
    method's he.csv rows, judged against its collapse point (from ``checkpoints``):

    - ``collapse_batch``: the batch whose edits reach the collapse point (None: none);
    - ``largest_batch`` and ``largest_lead``: the batch of the largest absolute HE change
      of any layer, and how many batches before the collapse it came (negative: after);
    - ``alarms``: every alarm (batch, edits, layer, change, threshold);
    - ``flagged``: whether an alarm came at most ``horizon`` batches before (or at) the
      collapse batch, and ``first_lead`` the lead of the first such alarm;
    - ``false_alarms``: alarms earlier than ``horizon`` batches before the collapse (every
      alarm when there is none), and ``false_alarm_batches`` the batches they fall in;
      ``late_alarms``: alarms after the collapse batch, on a model already broken
      (neither a warning nor a false one).
    """
    batches = layer_changes(energy_rows)
    rule = EnergyWarning(k=k, warmup=warmup)
    alarms = []
    for edits, changes in batches:
        alarms += [{**a.to_dict(), "edits": edits} for a in rule.update(changes)]
    point = collapse_point(checkpoints)
    collapse_batch = next((i for i, (e, _) in enumerate(batches, 1) if e == point), None)
    largest = max(
        ((abs(v), i) for i, (_, changes) in enumerate(batches, 1) for v in changes.values()),
        default=None,
    )
    largest_batch = largest[1] if largest else None

    def leads(alarm: Mapping[str, Any]) -> bool:
        return collapse_batch is not None and 0 <= collapse_batch - alarm["batch"] <= horizon

    def after(alarm: Mapping[str, Any]) -> bool:
        return collapse_batch is not None and alarm["batch"] > collapse_batch

    hits = [a for a in alarms if leads(a)]
    late = [a for a in alarms if after(a)]
    false = [a for a in alarms if not leads(a) and not after(a)]
    return {
        "k": k,
        "warmup": warmup,
        "horizon": horizon,
        "batches": len(batches),
        "collapse": point,
        "collapse_batch": collapse_batch,
        "largest_batch": largest_batch,
        "largest_lead": (
            None if collapse_batch is None or largest_batch is None
            else collapse_batch - largest_batch
        ),
        "alarms": alarms,
        "flagged": bool(hits),
        "first_lead": collapse_batch - hits[0]["batch"] if hits else None,
        "false_alarms": len(false),
        "false_alarm_batches": sorted({a["batch"] for a in false}),
        "late_alarms": len(late),
    }  # fmt: skip


def run_warning_evaluation(run_dir: str | Path, **options: Any) -> dict[str, dict[str, Any]]:
    """:func:`warning_evaluation` of every started method of a run (method → result)."""
    layout = BenchRunDir(run_dir)
    out = {}
    for spec in layout.methods():
        folder = layout.method(spec)
        if folder.started():
            out[spec] = warning_evaluation(
                folder.read_energy(), folder.read_checkpoints(), **options
            )
    return out


# -- run-to-run spread over case orders ---------------------------------------------------


def order_spread(runs: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Methods run two or more times on the same model and data set (a
    :func:`~sphere_edit.bench.plots.read_run` dict per run, typically differing in
    ``case_order``), compared at each run's size N: per method, N and key, the mean, min,
    max and sample standard deviation of the metric after N edits over the runs that
    reach N, and the orders they came from. A run of more edits counts with its
    checkpoint at N (the cases edited so far on the model after N edits, which is what a
    run of N edits evaluates on its final model), so a file-order run of 5,000 edits
    pairs with shuffled runs of 2,000."""
    sizes: dict[tuple[str, str], set[int]] = {}
    for run in runs:
        summary = run["summary"]
        sizes.setdefault((summary["model"], summary["dataset"]), set()).add(summary["n_edits"])
    found: dict[tuple[str, str, int, str], list[tuple[str, Mapping[str, Any]]]] = {}
    for run in runs:
        summary = run["summary"]
        order = run["config"]["config"].get("case_order") or "file"
        for spec, data in run["methods"].items():
            at = {c["edits"]: c["metrics"] for c in data.get("checkpoints", [])}
            if data.get("summary"):
                at[summary["n_edits"]] = data["summary"]["final"]["metrics"]
            for size in sorted(sizes[(summary["model"], summary["dataset"])]):
                if size in at:
                    group = (summary["model"], summary["dataset"], size, spec)
                    found.setdefault(group, []).append((order, at[size]))
    out = []
    for (model, dataset, n_edits, spec), results in found.items():
        if len(results) < 2:
            continue
        stats = {}
        for key in keys:
            values = [m[key] for _, m in results if m.get(key) is not None]
            if len(values) >= 2:
                stats[key] = {
                    "mean": statistics.fmean(values),
                    "min": min(values),
                    "max": max(values),
                    "std": statistics.stdev(values),
                }
        out.append(
            {
                "model": model, "dataset": dataset, "n_edits": n_edits, "method": spec,
                "orders": [order for order, _ in results], "metrics": stats,
            }
        )  # fmt: skip
    return out
