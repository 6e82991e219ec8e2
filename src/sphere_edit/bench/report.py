"""``sphere-edit report``: one self-contained HTML page (plots embedded) from one or more
benchmark run directories, and the same table for the terminal."""

from __future__ import annotations

import html
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..editing.build import MethodSpec
from .figures import img_tag
from .plots import plot_figures, read_run
from .rundir import BenchRunDir

IN_PROGRESS = (
    "Edits marked * belong to a run still in progress: that row is its latest checkpoint "
    "(the cases edited so far, on the model at that point); fluency and consistency are "
    "measured on the final model only."
)

# The paper's columns, per dataset: (label, key in the aggregated metrics). Labels hold
# no spaces: a header cell is "<group label> <column label>".
COLUMNS = (
    ("Eff.", "efficacy"),
    ("Gen.", "generalization"),
    ("Spe.", "specificity"),
    ("Eff.P", "rewrite_prob_success"),
    ("Gen.P", "paraphrase_prob_success"),
    ("Spe.P", "neighborhood_prob_success"),
    ("Flu.", "fluency"),
    ("Consis.", "consistency"),
)

# What each column means, per dataset kind (summary.json's "dataset").
LEGENDS = {
    "counterfact": (
        "Eff., Gen., Spe.: top-1 accuracy of rewrite, paraphrase and neighbourhood prompts "
        "(every token of the expected target the argmax under teacher forcing; expected: "
        "the new target, for neighbourhood prompts the true answer). Eff.P, Gen.P: "
        "P(new) > P(old) on rewrite and paraphrase prompts; Spe.P: P(true) > P(new) on "
        "neighbourhood prompts (total log-probability of each target's tokens)."
    ),
    "zsre": (
        "Eff., Gen., Spe.: token-level accuracy (the fraction of the expected target's "
        "tokens that are the argmax under teacher forcing) of the question, its rephrase "
        "and the NQ question against its answer."
    ),
}
ZSRE_TOP1 = ("rewrite_top1", "paraphrase_top1", "neighborhood_top1")
FLUENCY_LEGEND = (
    "Flu.: n-gram entropy of generations (bits); Consis.: TF-IDF cosine of generations "
    "to the reference snippets."
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
        group.setdefault("config", run["config"])
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


def legend(group: dict[str, Any]) -> str:
    """What the group's metric columns measure, for its dataset kind."""
    kind = group["summary"]["dataset"]
    text = LEGENDS.get(kind, LEGENDS["counterfact"])
    if kind == "zsre":
        pre = group["summary"]["pre_edit"]["metrics"]
        if all(key in pre for key in ZSRE_TOP1):
            shown = ", ".join(f"{k} {_cell(pre[k])}" for k in ZSRE_TOP1)
            text += f" Whole-target top-1 (pre-edit, ×100): {shown}."
        else:
            text += (
                " Whole-target top-1 is not in summary.json (this run aggregated token "
                "accuracies only; cases.jsonl holds each prompt's top1)."
            )
    return f"{text} {FLUENCY_LEGEND}"


def missing_reasons(group: dict[str, Any]) -> list[str]:
    """Why the group's columns show "–" where they do: one "<column>: <reason>" each."""
    metrics = [group["summary"]["pre_edit"]["metrics"]]
    metrics += [_status(data, group["n_edits"])[0] for data in group["methods"].values()]
    cases = group.get("config", {}).get("config", {}).get("fluency_cases", 0)
    reasons = []
    for label, key in COLUMNS:
        if all(m.get(key) is not None for m in metrics):
            continue
        if key.endswith("_prob_success") and group["summary"]["dataset"] == "zsre":
            why = "zsRE has no probability comparison (one target per prompt)"
        elif key in ("fluency", "consistency") and not cases:
            why = "not run (--fluency-cases 0)"
        elif key == "consistency" and any(m.get("fluency") is not None for m in metrics):
            why = "no reference snippets for this data"
        elif key == "fluency":
            why = "not measured yet: fluency is measured on the final model only"
        else:
            why = "not in the results of this run"
        reasons.append(f"{label} –: {why}")
    return reasons


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


def _html_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], groups: Sequence[str] = ()
) -> str:
    """A table; with ``groups``, header cells "<group> <label>" are shown as the group
    once over its columns and the labels below it."""
    if groups:
        width = (len(header) - 1) // len(groups)
        top = f"<th rowspan='2'>{html.escape(header[0])}</th>" + "".join(
            f"<th colspan='{width}' class='group'>{html.escape(g)}</th>" for g in groups
        )
        labels = "".join(
            f"<th>{html.escape(h[len(groups[(c - 1) // width]) + 1 :])}</th>"
            for c, h in enumerate(header[1:], start=1)
        )
        head = f"{top}</tr><tr>{labels}"
    else:
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
    owners = shared_vstar(run, run_dir)
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
            + [
                _phase(timings, p, owners.get(spec), data["progress"].get("batches", 0))
                for p in PHASES
            ]
            + [total]
        )
    header = (
        ["method", "ρ(HE, Eff.)", "ρ(HE, Gen.)", "ρ(HE, Spe.)"]
        + [f"{p} (s)" for p in PHASES]
        + ["total (s)"]
    )
    parts.append("<h4>HE correlation (Spearman, checkpoints) and time per phase</h4>")
    parts.append(_html_table(header, rows))
    parts.append(
        "<p class='note'>ρ –: too few checkpoints (it needs 3 or more), constant series "
        "(HE or the metric did not change across checkpoints, so no rank order), or in "
        "progress (computed when the method finishes). targets: the v* optimisation; "
        "“v* shared with M”: batch 1's v* was computed by method M on the same base model, "
        "requests and target settings, and reused.</p>"
    )
    from .geometry import geometry_html

    for spec in run["methods"]:  # written by ``sphere-edit geometry RUN``
        summary = BenchRunDir(run_dir).method(spec).read_geometry()
        if summary is not None:
            parts.append(geometry_html(summary, title=f"Weight geometry: {spec}"))
    return "\n".join(parts)


def shared_vstar(run: dict[str, Any], run_dir: Path | None = None) -> dict[str, str]:
    """Methods whose v* of batch 1 was computed by an earlier method of the run (method →
    that method): the benchmark shares it between closed-form methods whose sessions
    have equal v* keys (last edited layer, context templates, target settings), within
    one process. Where ``run_dir``'s journal records whether batch 1 took its v* from
    outside (``vstar_given``), that decides: a method resumed in a new process computed
    its own. Journals from before the record: the v* keys alone."""
    from ..editing.session import vstar_key
    from ..methods import make_method
    from ..methods.base import edits_per_request, is_gradient_method

    owners: dict[str, str] = {}
    first: dict[str, str] = {}
    for spec, data in run["methods"].items():
        header = (data["summary"] or {}).get("session")
        if not header:
            continue
        try:
            method = make_method(MethodSpec.parse(spec).method)
        except ValueError:
            continue
        if is_gradient_method(method) or edits_per_request(method):
            continue
        key = vstar_key(header["layers"][-1], header["templates"], header["target"])
        given = None if run_dir is None else _vstar_given(run_dir, spec)
        if key in first and given is not False:
            owners[spec] = first[key]
        elif key not in first:
            first[key] = spec
    return owners


def _vstar_given(run_dir: Path, spec: str) -> bool | None:
    """Whether the journal of ``spec`` in ``run_dir`` says batch 1 took its v* from
    another method; None where the journal is missing or from before the record."""
    from ..editing.journal import Journal

    journal = Journal(BenchRunDir(run_dir).method(spec).journal)
    try:
        index = journal.index()
        if not index.get("batches"):
            return None
        record = journal.record(index["batches"][0])
    except (OSError, ValueError):
        return None
    given = record.get("vstar_given")
    return given if isinstance(given, bool) else None


def _phase(timings: dict[str, float], phase: str, owner: str | None, n_batches: int) -> str:
    seconds = f"{timings.get(phase, 0.0):.1f}"
    if phase != "targets" or owner is None:
        return seconds
    if n_batches <= 1:
        return f"v* shared with {owner}"
    return f"{seconds} (batch 1: v* shared with {owner})"


def _figures(group: dict[str, Any]) -> list[str]:
    """The group's curves with every method in one figure, drawn from the run files now
    (a run still in progress has no figures of its own yet); nothing is written into the
    run directories."""
    with tempfile.TemporaryDirectory() as folder:
        paths = plot_figures(group, Path(folder))
        return [img_tag(path, path.stem) for path in paths]


PHASES = ("statistics", "targets", "keys", "solve", "projection", "energy", "evaluation")


def _rho(entry: dict[str, Any] | None) -> str:
    """ρ, or "–" and why there is none."""
    entry = entry or {}
    value = entry.get("spearman")
    if value is not None:
        return f"{value:+.2f}"
    if "reason" in entry:  # the runner's: fewer than 3 checkpoints
        return "– (too few checkpoints)"
    if not entry:
        return "– (in progress)"
    return "– (constant series)"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1400px; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th.group { text-align: center; background: #f3f3f3; }
p.note { color: #444; font-size: 0.9em; }
"""


def build_report(run_dirs: Sequence[str | Path]) -> str:
    run_dirs = [Path(d) for d in run_dirs]
    labels, header, rows = table(run_dirs)
    grouped = group_runs(run_dirs)
    notes = [
        f"<p class='note'><b>{html.escape(label)}</b>: "
        + html.escape(" ".join([legend(group), *(f"{r}." for r in missing_reasons(group))]))
        + "</p>"
        for label, group in grouped.items()
    ]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>sphere-edit report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>sphere-edit report</h1>",
        "<p>All columns ×100, as in the paper, of every edited case on the final model. "
        f"{IN_PROGRESS}</p>",
        _html_table(header, rows, labels),
        *notes,
    ]
    plugin_header, plugin_rows = plugin_table(run_dirs)
    if plugin_rows:
        parts += [
            "<h2>SPHERE as a plug-in</h2>",
            "<p>Each method without and with the SPHERE projection, same cases and order; "
            "change = (with − without) / without.</p>",
            _html_table(plugin_header, plugin_rows),
        ]
    for label, group in grouped.items():
        parts.append(f"<h2>{html.escape(label)}</h2>")
        parts.extend(_figures(group))
        parts.extend(_run_section(d) for d in group["run_dirs"])
    parts.extend(study_sections(run_dirs))
    parts.append("</body></html>")
    return "\n".join(parts)


# -- the long sequential studies: intervals, collapse, pooled fit, warning, spread ---------

INTERVALS_NOTE = (
    "Mean over cases ×100 and its 95% percentile-bootstrap interval (1,000 resamples of "
    "the cases, seed 0), on the final model; a run still in progress has none yet."
)


def interval_table(run_dirs: Sequence[str | Path]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per run and finished method (and the pre-edit model), every
    column of :data:`COLUMNS` as "mean [low, high]" ×100."""
    from .analysis import format_interval, run_intervals

    keys = [key for _, key in COLUMNS]
    header = ["run", "method"] + [label for label, _ in COLUMNS]
    rows = []
    for run_dir in run_dirs:
        for name, intervals in run_intervals(run_dir, keys).items():
            rows.append(
                [Path(run_dir).name, name] + [format_interval(intervals.get(k)) for k in keys]
            )
    return header, rows


def collapse_table(group: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per method, its collapse point and Spearman ρ(HE, metric) before
    and after it (see :func:`.analysis.collapse_correlations`)."""
    from .analysis import COLLAPSE_METRICS, NO_COLLAPSE, collapse_correlations, format_rho

    short = {"efficacy": "Eff.", "generalization": "Gen.", "specificity": "Spe."}
    header = ["method", "collapse point (edits)"]
    header += [f"ρ {side} ({short[m]})" for side in ("before", "after") for m in COLLAPSE_METRICS]
    rows = []
    for spec, data in group["methods"].items():
        result = collapse_correlations(data["checkpoints"], data["energy"])
        point = result["collapse"]
        row = [spec, NO_COLLAPSE if point is None else str(point)]
        row += [
            format_rho(result[side][m]) for side in ("before", "after") for m in COLLAPSE_METRICS
        ]
        rows.append(row)
    return header, rows


def pooled_fit_table(pooled: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per metric, the pooled ΔHE–Δmetric line's slope, r, p and n."""
    header = ["metric", "slope", "r", "p-value", "points"]
    rows = []
    for metric, entry in pooled.items():
        fit = entry["fit"]
        n = sum(len(p) for p in entry["points"].values())
        if fit is None:
            rows.append([metric, "–", "–", "–", f"{n} (needs 3 and unequal ΔHE)"])
        else:
            rows.append([metric, f"{fit.slope:.3g}", f"{fit.r:+.2f}", f"{fit.p_value:.2g}", str(n)])
    return header, rows


def warning_table(run_dirs: Sequence[str | Path]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): the HE early-warning rule replayed on each method's he.csv."""
    from .analysis import run_warning_evaluation

    header = [
        "run", "method", "collapse batch", "largest ΔHE batch", "its lead (batches)",
        "alarms", "flagged", "first alarm lead", "false alarms", "after the collapse",
    ]  # fmt: skip
    rows = []
    for run_dir in run_dirs:
        for spec, r in run_warning_evaluation(run_dir).items():
            shown = [r["collapse_batch"], r["largest_batch"], r["largest_lead"]]
            rows.append(
                [Path(run_dir).name, spec]
                + ["–" if v is None else str(v) for v in shown]
                + [
                    str(len(r["alarms"])),
                    ("yes" if r["flagged"] else "no") if r["collapse_batch"] else "no collapse",
                    "–" if r["first_lead"] is None else str(r["first_lead"]),
                    str(r["false_alarms"]),
                    str(r["late_alarms"]),
                ]
            )
    return header, rows


def spread_table(run_dirs: Sequence[str | Path]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): methods run several times with different case orders: each
    headline metric's mean, min–max and standard deviation ×100 over the runs."""
    from .analysis import order_spread

    keys = [key for _, key in COLUMNS[:6]]
    header = ["group", "method", "orders"] + [label for label, _ in COLUMNS[:6]]
    rows = []
    for entry in order_spread([read_run(d) for d in run_dirs], keys):
        row = [
            f"{entry['model']} {entry['dataset']} (n={entry['n_edits']})",
            entry["method"],
            ", ".join(entry["orders"]),
        ]
        for key in keys:
            s = entry["metrics"].get(key)
            row.append(
                "–"
                if s is None
                else f"{100 * s['mean']:.2f} "
                f"({100 * s['min']:.2f}–{100 * s['max']:.2f}, std {100 * s['std']:.2f})"
            )
        rows.append(row)
    return header, rows


def study_sections(run_dirs: Sequence[str | Path]) -> list[str]:
    """The report's sections for the long sequential studies: bootstrap intervals, the
    collapse point with ρ before and after it, the pooled difference fit, the HE
    early-warning rule and the spread over case orders (when runs repeat a method)."""
    from ..sphere.warning import DEFAULT_K, DEFAULT_WARMUP
    from .analysis import DEFAULT_HORIZON, pooled_difference_fits
    from .plots import plot_collapse, plot_pooled_differences

    header, rows = interval_table(run_dirs)
    parts = ["<h2>Bootstrap intervals</h2>", f"<p>{INTERVALS_NOTE}</p>", _html_table(header, rows)]
    for label, group in group_runs(run_dirs).items():
        header, rows = collapse_table(group)
        pooled = pooled_difference_fits(group)
        fit_header, fit_rows = pooled_fit_table(pooled)
        with tempfile.TemporaryDirectory() as folder:
            figures = [
                img_tag(plot_collapse(group, Path(folder) / "collapse.png"), "collapse"),
                img_tag(plot_pooled_differences(pooled, Path(folder) / "pooled.png"), "pooled fit"),
            ]
        parts += [
            f"<h2>Collapse: {html.escape(label)}</h2>",
            "<p>Collapse point: the first checkpoint where efficacy is below half its value "
            "at the first checkpoint. ρ: Spearman between HE (mean over edited layers) and "
            "the metric over the checkpoints before the collapse point and from it on; a "
            "side needs 3 or more checkpoints.</p>",
            _html_table(header, rows),
            figures[0],
            "<h3>ΔHE against Δmetric between consecutive checkpoints, all methods</h3>",
            _html_table(fit_header, fit_rows),
            figures[1],
        ]
    header, rows = warning_table(run_dirs)
    parts += [
        "<h2>HE early warning</h2>",
        f"<p>The rule (per layer: a batch's HE change above k = {DEFAULT_K:g} times the "
        f"median of the earlier absolute changes, after {DEFAULT_WARMUP} batches of "
        "warm-up) replayed on each method's he.csv. Lead: batches before the collapse "
        f"batch; flagged: an alarm at most {DEFAULT_HORIZON} batches before it; false "
        "alarms: alarms earlier than that, or in a run that does not collapse; the last "
        "column counts alarms after the collapse.</p>",
        _html_table(header, rows),
    ]
    header, rows = spread_table(run_dirs)
    if rows:
        parts += [
            "<h2>Run-to-run spread over case orders</h2>",
            "<p>Final-model metrics ×100 of the same method and size in runs that differ "
            "in case order: mean (min–max, sample std).</p>",
            _html_table(header, rows),
        ]
    return parts
