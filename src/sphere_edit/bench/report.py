"""``sphere-edit report``: one self-contained HTML page (plots embedded) from one or more
benchmark run directories, and the same table for the terminal."""

from __future__ import annotations

import html
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .figures import img_tag
from .plots import plot_figures, read_run
from .rundir import BenchRunDir

IN_PROGRESS = (
    "Edits marked * belong to a run still in progress: that row is its latest checkpoint "
    "(the cases edited so far, on the model at that point); fluency and consistency are "
    "measured on the final model only."
)

# The paper's columns, per dataset: (label, key in the aggregated metrics).
COLUMNS = (
    ("Eff.", "efficacy"),
    ("Gen.", "generalization"),
    ("Spe.", "specificity"),
    ("Flu.", "fluency"),
    ("Consis.", "consistency"),
)


def _cell(value: Any) -> str:
    # Every column ×100, as in the paper's tables (fluency 6.22 bits reads 622).
    return "–" if value is None else f"{100 * value:.2f}"


def _status(data: dict[str, Any], n_edits: int) -> tuple[dict[str, Any], str]:
    """(metrics, edits) of a method's row: its final-model results when it finished, else
    its latest checkpoint, whose edits are starred."""
    if data.get("summary"):
        return data["summary"]["final"]["metrics"], str(n_edits)
    if data["checkpoints"]:
        last = data["checkpoints"][-1]
        return last["metrics"], f"{last['edits']}*"
    return {}, "0*"


def group_runs(run_dirs: Sequence[str | Path]) -> dict[str, dict[str, Any]]:
    """Runs of the same model, data set and number of edits, merged into one column group:
    methods benchmarked in separate runs (e.g. one process per method) side by side. The
    pre-edit row is the first run's (every run evaluates the same base model on the same
    cases); a method present in two runs of a group is named with its run's folder."""
    groups: dict[str, dict[str, Any]] = {}
    for run_dir in run_dirs:
        run = read_run(run_dir)
        summary = run["summary"]
        label = f"{summary['model']} {summary['dataset']} (n={summary['n_edits']})"
        group = groups.setdefault(
            label,
            {"summary": summary, "methods": {}, "run_dirs": [], "n_edits": summary["n_edits"]},
        )
        group["run_dirs"].append(Path(run_dir))
        for spec, data in run["methods"].items():
            name = spec if spec not in group["methods"] else f"{spec} ({Path(run_dir).name})"
            group["methods"][name] = data
    return groups


def table(run_dirs: Sequence[str | Path]) -> tuple[list[str], list[str], list[list[str]]]:
    """(column groups, header, rows): methods as rows, "pre-edit" first; the final-model
    protocol (every edited case on the final model), or for a run still in progress the
    latest checkpoint, its number of edits starred."""
    groups = group_runs(run_dirs)
    labels = ["Edits"] + [label for label, _ in COLUMNS]
    header = ["method"] + [f"{g} {label}" for g in groups for label in labels]
    names = ["pre-edit"]
    for group in groups.values():
        names.extend(m for m in group["methods"] if m not in names)
    rows = []
    for name in names:
        row = [name]
        for group in groups.values():
            if name == "pre-edit":
                metrics, edits = group["summary"]["pre_edit"]["metrics"], "0"
            elif name in group["methods"]:
                metrics, edits = _status(group["methods"][name], group["n_edits"])
            else:
                metrics, edits = {}, "–"
            row.append(edits)
            row.extend(_cell(metrics.get(key)) for _, key in COLUMNS)
        rows.append(row)
    return list(groups), header, rows


PLUGIN_METRICS = (
    ("Eff.", "efficacy"),
    ("Gen.", "generalization"),
    ("Spe.", "specificity"),
    ("Flu.", "fluency"),
)


def relative_change(without: float | None, with_sphere: float | None) -> float | None:
    """(with − without) / without; None where either is missing or ``without`` is 0."""
    if without is None or with_sphere is None or without == 0:
        return None
    return (with_sphere - without) / without


def plugin_table(run_dirs: Sequence[str | Path]) -> tuple[list[str], list[list[str]]]:
    """SPHERE as a plug-in: one row per method that was run both without and with
    ``+sphere`` in the same column group (model, data set, edits), giving each metric
    without, with, and the relative change (%). Runs in progress count at their latest
    checkpoint, starred as in :func:`table`."""
    header = ["group", "method", "edits"]
    for label, _ in PLUGIN_METRICS:
        header += [label, f"{label} +SPHERE", f"{label} change %"]
    rows = []
    for label, group in group_runs(run_dirs).items():
        methods = group["methods"]
        for name, data in methods.items():
            paired = methods.get(f"{name}+sphere")
            if name.endswith("+sphere") or paired is None:
                continue
            plain, edits = _status(data, group["n_edits"])
            projected, edits_sphere = _status(paired, group["n_edits"])
            shown = edits if edits == edits_sphere else f"{edits} / {edits_sphere}"
            row = [label, name, shown]
            for _, key in PLUGIN_METRICS:
                change = relative_change(plain.get(key), projected.get(key))
                row += [
                    _cell(plain.get(key)),
                    _cell(projected.get(key)),
                    "–" if change is None else f"{100 * change:+.1f}",
                ]
            rows.append(row)
    return header, rows


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _run_section(run_dir: Path) -> str:
    run = read_run(run_dir)
    summary, config = run["summary"], run["config"]
    cfg = config["config"]
    env = config["environment"]
    wall = summary.get("wall_seconds")
    parts = [f"<h3>{html.escape(str(run_dir))}</h3>"]
    parts.append(
        "<p>"
        + html.escape(
            f"model {summary['model']}, dataset {summary['dataset']} "
            f"({config['dataset']['path']}), {cfg['n_edits']} edits in batches of "
            f"{cfg['batch_size']}, checkpoints {config['checkpoints']}, seed {cfg['seed']}; "
            f"torch {env['torch']}, transformers {env['transformers']}, {env['platform']}, "
            f"{env['cpu_threads']} threads on {env['device']}; "
            + (f"wall time {wall:.0f} s" if wall is not None else "in progress")
        )
        + "</p>"
    )
    rows = []
    for spec, data in run["methods"].items():
        method = data["summary"]
        if method:
            corr, timings = method["correlations"], method["timings"]
            total = f"{method['wall_seconds']:.0f}"
        else:  # still running: the time so far, no correlations yet
            corr, timings = {}, data["progress"].get("timings", {})
            total = f"in progress ({data['progress'].get('batches', 0)} batches)"
        rows.append(
            [spec]
            + [_rho(corr.get(m)) for m in ("efficacy", "generalization", "specificity")]
            + [f"{timings.get(p, 0.0):.1f}" for p in PHASES]
            + [total]
        )
    header = (
        ["method", "ρ(HE, Eff.)", "ρ(HE, Gen.)", "ρ(HE, Spe.)"]
        + [f"{p} (s)" for p in PHASES]
        + ["total (s)"]
    )
    parts.append("<h4>HE correlation (Spearman, checkpoints) and time per phase</h4>")
    parts.append(_html_table(header, rows))
    from .geometry import geometry_html

    for spec in run["methods"]:  # written by ``sphere-edit geometry RUN``
        summary = BenchRunDir(run_dir).method(spec).read_geometry()
        if summary is not None:
            parts.append(geometry_html(summary, title=f"Weight geometry: {spec}"))
    return "\n".join(parts)


def _figures(group: dict[str, Any]) -> list[str]:
    """The group's curves with every method in one figure, drawn from the run files now
    (a run still in progress has no figures of its own yet); nothing is written into the
    run directories."""
    with tempfile.TemporaryDirectory() as folder:
        paths = plot_figures(group, Path(folder))
        return [img_tag(path, path.stem) for path in paths]


PHASES = ("statistics", "targets", "keys", "solve", "projection", "energy", "evaluation")


def _rho(entry: dict[str, Any] | None) -> str:
    value = (entry or {}).get("spearman")
    return "–" if value is None else f"{value:+.2f}"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1400px; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
"""


def build_report(run_dirs: Sequence[str | Path]) -> str:
    run_dirs = [Path(d) for d in run_dirs]
    _, header, rows = table(run_dirs)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>sphere-edit report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>sphere-edit report</h1>",
        "<p>All columns ×100, as in the paper: efficacy, generalization and specificity are "
        "top-1 accuracies (every target token the argmax under teacher forcing) of every "
        "edited case on the final model; fluency is the n-gram entropy of generations "
        "(bits); consistency the TF-IDF cosine to reference text (– where the data has none). "
        f"{IN_PROGRESS}</p>",
        _html_table(header, rows),
    ]
    plugin_header, plugin_rows = plugin_table(run_dirs)
    if plugin_rows:
        parts += [
            "<h2>SPHERE as a plug-in</h2>",
            "<p>Each method without and with the SPHERE projection, same cases and order; "
            "change = (with − without) / without.</p>",
            _html_table(plugin_header, plugin_rows),
        ]
    for label, group in group_runs(run_dirs).items():
        parts.append(f"<h2>{html.escape(label)}</h2>")
        parts.extend(_figures(group))
        parts.extend(_run_section(d) for d in group["run_dirs"])
    parts.append("</body></html>")
    return "\n".join(parts)
