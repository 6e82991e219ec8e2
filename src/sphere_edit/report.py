"""``sphere-edit report``: one self-contained HTML page (plots embedded) from one or more
benchmark run directories, and the same table for the terminal."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .figures import img_tag
from .plots import plot_run, read_run

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


def table(run_dirs: Sequence[str | Path]) -> tuple[list[str], list[str], list[list[str]]]:
    """(dataset per column group, header, rows): methods as rows, "pre-edit" first; the
    final-model protocol (every edited case on the final model)."""
    runs = [read_run(d) for d in run_dirs]
    datasets = [f"{r['summary']['dataset']} (n={r['summary']['n_edits']})" for r in runs]
    header = ["method"] + [f"{d} {label}" for d in datasets for label, _ in COLUMNS]
    names = ["pre-edit"]
    for run in runs:
        names.extend(m for m in run["methods"] if m not in names)
    rows = []
    for name in names:
        row = [name]
        for run in runs:
            if name == "pre-edit":
                metrics = run["summary"]["pre_edit"]["metrics"]
            else:
                method = (run["methods"].get(name) or {}).get("summary")
                metrics = method["final"]["metrics"] if method else {}
            row.extend(_cell(metrics.get(key)) for _, key in COLUMNS)
        rows.append(row)
    return datasets, header, rows


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _run_section(run_dir: Path) -> str:
    run = read_run(run_dir)
    summary, config = run["summary"], run["config"]
    plots = run_dir / "plots"
    if not (plots / "metrics.png").exists():
        plot_run(run_dir)
    parts = [f"<h2>{html.escape(str(run_dir))}</h2>"]
    cfg = config["config"]
    env = config["environment"]
    parts.append(
        "<p>"
        + html.escape(
            f"model {summary['model']}, dataset {summary['dataset']} "
            f"({config['dataset']['path']}), {cfg['n_edits']} edits in batches of "
            f"{cfg['batch_size']}, checkpoints {config['checkpoints']}, seed {cfg['seed']}; "
            f"torch {env['torch']}, transformers {env['transformers']}, {env['platform']}, "
            f"{env['cpu_threads']} threads on {env['device']}; "
            f"wall time {summary.get('wall_seconds', 0):.0f} s"
        )
        + "</p>"
    )
    for png in sorted(plots.glob("*.png")):
        parts.append(img_tag(png, png.stem))
    rows = []
    for spec, data in run["methods"].items():
        method = data["summary"]
        if not method:
            continue
        corr = method["correlations"]
        timings = method["timings"]
        rows.append(
            [spec]
            + [_rho(corr.get(m)) for m in ("efficacy", "generalization", "specificity")]
            + [f"{timings.get(p, 0.0):.1f}" for p in PHASES]
            + [f"{method['wall_seconds']:.0f}"]
        )
    header = (
        ["method", "ρ(HE, Eff.)", "ρ(HE, Gen.)", "ρ(HE, Spe.)"]
        + [f"{p} (s)" for p in PHASES]
        + ["total (s)"]
    )
    parts.append("<h3>HE correlation (Spearman, checkpoints) and time per phase</h3>")
    parts.append(_html_table(header, rows))
    geometry = run_dir / "geometry" / "summary.json"
    if geometry.exists():
        from .geometry import geometry_html

        parts.append(geometry_html(json.loads(geometry.read_text(encoding="utf-8"))))
    return "\n".join(parts)


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
        "(bits); consistency the TF-IDF cosine to reference text (– where the data has none).</p>",
        _html_table(header, rows),
    ]
    parts.extend(_run_section(d) for d in run_dirs)
    parts.append("</body></html>")
    return "\n".join(parts)
