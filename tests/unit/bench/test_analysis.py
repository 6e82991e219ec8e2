"""The analyses of long sequential runs against their definitions, and on a tiny run:
bootstrap intervals, the collapse point and ρ before/after it, the pooled difference fit,
the HE warning rule's evaluation, case orders, and the report's new sections."""

from __future__ import annotations

import functools
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import special, stats
from typer.testing import CliRunner

from sphere_edit.bench import runner as runner_module
from sphere_edit.bench.analysis import (
    NO_COLLAPSE,
    TOO_FEW,
    _incomplete_beta,
    bootstrap_interval,
    case_intervals,
    collapse_correlations,
    collapse_point,
    difference_points,
    format_interval,
    layer_changes,
    order_spread,
    pooled_fit,
    warning_evaluation,
)
from sphere_edit.bench.config import order_cases, order_seed
from sphere_edit.bench.report import build_report, interval_table, spread_table, warning_table
from sphere_edit.bench.runner import BenchConfig, Benchmark
from sphere_edit.cli.app import app
from sphere_edit.model.loading import LoadedModel
from sphere_edit.sphere.warning import EnergyWarning
from tests import FIXTURES_DIR
from tests.tiny_models import make_tiny_model

# -- bootstrap ----------------------------------------------------------------------------


def test_the_interval_of_a_constant_column_has_zero_width():
    interval = bootstrap_interval([0.75] * 40)
    assert (interval.mean, interval.low, interval.high, interval.n) == (0.75, 0.75, 0.75, 40)


def test_the_bootstrap_is_reproducible_and_its_seed_matters():
    values = [float(v) for v in np.random.default_rng(3).random(57)]
    assert bootstrap_interval(values) == bootstrap_interval(values)
    assert bootstrap_interval(values, seed=1) != bootstrap_interval(values, seed=2)


def test_the_interval_is_the_quantiles_of_the_resampled_means():
    values = np.random.default_rng(4).random(31)
    got = bootstrap_interval(values, resamples=300, seed=9, level=0.9)
    picks = np.random.default_rng(9).integers(0, 31, size=(300, 31))
    means = values[picks].mean(axis=1)
    assert got.mean == pytest.approx(values.mean())
    assert (got.low, got.high) == pytest.approx(tuple(np.quantile(means, [0.05, 0.95])))


def test_coverage_is_roughly_the_level_on_bernoulli_samples():
    rng = np.random.default_rng(0)
    p, trials = 0.3, 300
    covered = 0
    for trial in range(trials):
        sample = (rng.random(120) < p).astype(float)
        interval = bootstrap_interval(sample, resamples=400, seed=trial)
        covered += interval.low <= p <= interval.high
    assert 0.89 <= covered / trials <= 0.99


def test_case_intervals_resolve_headline_names_and_skip_missing_values():
    rows = [
        {"rewrite_top1": 1.0, "ngram_entropy": 6.0},
        {"rewrite_top1": 0.0, "ngram_entropy": None},
        {"rewrite_top1": 1.0},
    ]
    out = case_intervals(rows, ["efficacy", "fluency", "consistency"], resamples=50)
    assert out["efficacy"]["mean"] == pytest.approx(2 / 3) and out["efficacy"]["n"] == 3
    assert out["fluency"] == {"mean": 6.0, "low": 6.0, "high": 6.0, "n": 1}
    assert "consistency" not in out
    assert format_interval(out["fluency"]) == "600.00 [600.00, 600.00]"
    assert format_interval(None) == "–"


# -- collapse -----------------------------------------------------------------------------


def _checkpoints(efficacy, **others):
    return [
        {
            "edits": 100 * (i + 1),
            "metrics": {"efficacy": e, **{k: v[i] for k, v in others.items()}},
        }
        for i, e in enumerate(efficacy)
    ]


def test_the_collapse_point_is_the_first_checkpoint_below_half_the_first_value():
    assert collapse_point(_checkpoints([0.9, 0.8, 0.46, 0.44, 0.2])) == 400
    assert collapse_point(_checkpoints([0.9, 0.45, 0.9])) is None  # 0.45 is not below half
    assert collapse_point(_checkpoints([0.9, 0.8])) is None
    assert collapse_point([]) is None


def test_spearman_before_and_after_the_collapse_matches_scipy():
    efficacy = [0.95, 0.9, 0.85, 0.7, 0.4, 0.3, 0.35, 0.1]
    gen = [0.5, 0.52, 0.4, 0.45, 0.2, 0.1, 0.15, 0.05]
    spe = [0.8, 0.7, 0.75, 0.6, 0.5, 0.5, 0.4, 0.3]
    checkpoints = _checkpoints(efficacy, generalization=gen, specificity=spe)
    he = [3.0, 2.9, 2.95, 2.7, 2.2, 2.0, 2.1, 1.5]
    energy = {c["edits"]: h for c, h in zip(checkpoints, he, strict=True)}
    result = collapse_correlations(checkpoints, energy)
    assert result["collapse"] == 500
    for metric, series in (("efficacy", efficacy), ("generalization", gen), ("specificity", spe)):
        before = result["before"][metric]
        after = result["after"][metric]
        assert before["spearman"] == pytest.approx(stats.spearmanr(he[:4], series[:4])[0])
        assert after["spearman"] == pytest.approx(stats.spearmanr(he[4:], series[4:])[0])
        assert (before["n"], after["n"]) == (4, 4)


def test_no_collapse_and_too_few_checkpoints_are_said():
    checkpoints = _checkpoints([0.9, 0.9, 0.9], generalization=[1, 1, 1], specificity=[1, 1, 1])
    energy = {100: 1.0, 200: 2.0, 300: 3.0}
    result = collapse_correlations(checkpoints, energy)
    assert result["collapse"] is None
    assert result["before"]["efficacy"]["reason"] == NO_COLLAPSE
    late = _checkpoints(
        [0.9, 0.8, 0.7, 0.3], generalization=[0.1, 0.2, 0.3, 0.4], specificity=[1, 0, 1, 0]
    )
    result = collapse_correlations(late, {100: 1.0, 200: 2.0, 300: 3.0, 400: 4.0})
    assert result["collapse"] == 400
    assert result["before"]["generalization"]["spearman"] == pytest.approx(1.0)
    assert result["after"]["efficacy"] == {"spearman": None, "n": 1, "reason": TOO_FEW}


# -- pooled differences -------------------------------------------------------------------


def test_the_pooled_fit_matches_scipy_linregress():
    rng = np.random.default_rng(5)
    dx = rng.normal(size=23)
    dy = 0.7 * dx + rng.normal(scale=0.8, size=23)
    fit = pooled_fit(list(zip(dx.tolist(), dy.tolist(), strict=True)))
    reference = stats.linregress(dx, dy)
    assert fit.n == 23
    assert fit.slope == pytest.approx(reference.slope)
    assert fit.intercept == pytest.approx(reference.intercept)
    assert fit.r == pytest.approx(reference.rvalue)
    assert fit.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    assert pooled_fit([(1.0, 2.0), (2.0, 3.0)]) is None
    assert pooled_fit([(1.0, 2.0), (1.0, 3.0), (1.0, 0.0)]) is None


@pytest.mark.parametrize(("a", "b", "x"), [(0.5, 0.5, 0.3), (10.5, 0.5, 0.97), (2.0, 3.0, 0.6)])
def test_the_incomplete_beta_matches_scipy(a, b, x):
    assert _incomplete_beta(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-10)


def test_difference_points_are_consecutive_checkpoint_differences():
    checkpoints = _checkpoints([0.9, 0.5, 0.6])
    energy = {100: 1.0, 200: 1.5, 300: 1.25}
    points = difference_points(checkpoints, energy, "efficacy")
    assert [p[0] for p in points] == [0.5, -0.25]
    assert [p[1] for p in points] == pytest.approx([-0.4, 0.1])


# -- the warning rule on a run ------------------------------------------------------------


def _he_rows(changes_per_batch, layers=(0, 1)):
    """he.csv rows (edits, layer, energy) whose per-batch changes are the given ones."""
    rows = [(0, layer, 10.0) for layer in layers]
    level = dict.fromkeys(layers, 10.0)
    for b, changes in enumerate(changes_per_batch, 1):
        for layer in layers:
            level[layer] += changes.get(layer, 0.0)
            rows.append((100 * b, layer, level[layer]))
    return rows


def test_layer_changes_undo_he_rows():
    steps = [{0: 0.5, 1: -0.25}, {0: 0.125, 1: 1.0}]
    assert layer_changes(_he_rows(steps)) == [(100, steps[0]), (200, steps[1])]


def test_the_warning_evaluation_counts_lead_hits_and_false_alarms():
    steps = [{0: 1e-3, 1: 1e-3} for _ in range(20)]
    steps[5] = {0: 5e-2, 1: 1e-3}  # an alarm far from any collapse: false
    steps[12] = {0: 1e-3, 1: -8e-2}  # the largest change, 3 batches before the collapse
    steps[17] = {0: 6e-2, 1: 1e-3}  # after the collapse: neither a hit nor a false alarm
    efficacy = [0.9 if b < 15 else 0.2 for b in range(1, 21)]
    checkpoints = [
        {"edits": 100 * b, "metrics": {"efficacy": e}} for b, e in enumerate(efficacy, 1)
    ]
    result = warning_evaluation(_he_rows(steps), checkpoints, k=5, warmup=3, horizon=5)
    assert result["collapse"] == 1500 and result["collapse_batch"] == 15
    assert result["largest_batch"] == 13 and result["largest_lead"] == 2
    assert [(a["batch"], a["layer"]) for a in result["alarms"]] == [(6, 0), (13, 1), (18, 0)]
    assert result["flagged"] and result["first_lead"] == 2
    assert (result["false_alarms"], result["late_alarms"]) == (1, 1)
    assert result["false_alarm_batches"] == [6]
    quiet = warning_evaluation(_he_rows(steps), checkpoints[:10], k=5, warmup=3, horizon=5)
    assert quiet["collapse_batch"] is None and not quiet["flagged"]
    assert (quiet["false_alarms"], quiet["late_alarms"]) == (3, 0)
    assert quiet["false_alarm_batches"] == [6, 13, 18]


# -- case orders and their spread ---------------------------------------------------------


def test_a_shuffled_order_is_a_seeded_permutation():
    cases = list(range(50))
    once = order_cases(cases, "shuffle:1")
    assert once == order_cases(cases, "shuffle:1") and sorted(once) == cases
    assert once != cases and once != order_cases(cases, "shuffle:2")
    assert order_cases(cases, None) is cases and order_cases(cases, "file") is cases
    assert order_seed("shuffle:7") == 7


@pytest.mark.parametrize("bad", ["shuffle", "shuffle:x", "random:1"])
def test_a_bad_case_order_names_the_field(bad):
    with pytest.raises(ValueError, match="case_order"):
        BenchConfig(case_order=bad)


def test_the_spread_over_orders_is_mean_min_max_and_std():
    def run(order, efficacy):
        method = {"summary": {"final": {"metrics": {"efficacy": efficacy}}}}
        return {
            "summary": {"model": "m", "dataset": "counterfact", "n_edits": 2000},
            "config": {"config": {"case_order": order}},
            "methods": {"memit": method},
        }

    values = [0.5, 0.7, 0.6]
    runs = [run(None, 0.5), run("shuffle:1", 0.7), run("shuffle:2", 0.6)]
    # A longer file-order run counts with its checkpoint at 2,000 edits.
    longer = run(None, 0.1)
    longer["summary"]["n_edits"] = 5000
    longer["methods"]["memit"]["checkpoints"] = [{"edits": 2000, "metrics": {"efficacy": 0.5}}]
    (entry,) = order_spread([longer, *runs[1:]], ["efficacy"])
    assert entry["n_edits"] == 2000 and entry["metrics"]["efficacy"]["mean"] == pytest.approx(0.6)
    (entry,) = order_spread(runs, ["efficacy"])
    assert entry["orders"] == ["file", "shuffle:1", "shuffle:2"]
    got = entry["metrics"]["efficacy"]
    assert got["mean"] == pytest.approx(0.6) and (got["min"], got["max"]) == (0.5, 0.7)
    assert got["std"] == pytest.approx(float(np.std(values, ddof=1)))
    assert order_spread(runs[:1], ["efficacy"]) == []


# -- on a tiny run ------------------------------------------------------------------------


def _config(**overrides) -> BenchConfig:
    options = dict(
        model="tiny", methods=("memit", "alphaedit"),
        dataset=str(FIXTURES_DIR / "counterfact_rome.json"), n_edits=3, batch_size=1,
        checkpoint_every=1, stats_tokens=2000,
    )  # fmt: skip
    options.update(overrides)
    return BenchConfig(**options)


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, tiny_tokenizer):
    model = make_tiny_model("llama", tiny_tokenizer, seed=0)
    loaded = LoadedModel(model=model, tokenizer=tiny_tokenizer, name="tiny-llama")
    root = tmp_path_factory.mktemp("study")
    logged: list[str] = []
    patch = pytest.MonkeyPatch()
    # A warm-up of one batch, so that a run of three batches can raise alarms.
    patch.setattr(runner_module, "EnergyWarning", functools.partial(EnergyWarning, warmup=1))
    try:
        config = _config(he_warning=1e-9)
        Benchmark(config, root / "file", log=logged.append, progress=False, loaded=loaded).run()
    finally:
        patch.undo()
    shuffled = _config(case_order="shuffle:1")
    Benchmark(shuffled, root / "shuffled", log=lambda _: None, progress=False, loaded=loaded).run()
    return root, logged


def test_the_run_stores_intervals_of_every_table_column(study_run):
    root, _ = study_run
    summary = json.loads((root / "file" / "memit" / "summary.json").read_text())
    cases = [json.loads(line) for line in (root / "file" / "memit" / "cases.jsonl").open()]
    stored = summary["intervals"]
    assert stored["efficacy"]["mean"] == pytest.approx(summary["final"]["metrics"]["efficacy"])
    assert stored == case_intervals(cases, list(stored))
    assert {"generalization", "specificity", "neighborhood_prob_success"} <= set(stored)


def test_alarms_are_logged_and_recorded_in_the_batch_records(study_run):
    root, logged = study_run
    rows = [json.loads(line) for line in (root / "file" / "memit" / "batches.jsonl").open()]
    assert rows[0]["he_warnings"] == []  # the warm-up batch
    alarms = [a for row in rows for a in row["he_warnings"]]
    assert alarms, "a threshold of 1e-9 times the median must be exceeded"
    first = alarms[0]
    assert {"batch", "layer", "change", "threshold", "message"} <= set(first)
    assert any(first["message"] in line and "HE warning" in line for line in logged)
    config = json.loads((root / "file" / "config.json").read_text())["config"]
    assert config["he_warning"] == 1e-9 and config["case_order"] is None


def test_a_shuffled_run_edits_the_cases_in_its_order(study_run):
    root, _ = study_run
    config = json.loads((root / "shuffled" / "config.json").read_text())["config"]
    assert config["case_order"] == "shuffle:1"
    journal = json.loads((root / "shuffled" / "memit" / "journal" / "session.json").read_text())
    assert journal["batches"]
    file_order = json.loads((FIXTURES_DIR / "counterfact_rome.json").read_text())
    expected = order_cases(list(range(len(file_order))), "shuffle:1")
    cases = [json.loads(line) for line in (root / "shuffled" / "memit" / "cases.jsonl").open()]
    assert [c["case_id"] for c in cases] == [file_order[i]["case_id"] for i in expected]


def _with_collapse(run_dir, tmp_path):
    """A copy of the run whose checkpoints collapse at the last one."""
    copy = tmp_path / "collapsed"
    shutil.copytree(run_dir, copy)
    path = copy / "memit" / "checkpoints.jsonl"
    rows = [json.loads(line) for line in path.open()]
    for row, efficacy in zip(rows, (1.0, 0.9, 0.1), strict=True):
        row["metrics"]["efficacy"] = efficacy
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return copy


def test_the_report_shows_intervals_collapse_fit_warning_and_spread(study_run, tmp_path):
    root, _ = study_run
    collapsed = _with_collapse(root / "file", tmp_path)
    page = build_report([collapsed, root / "shuffled"])
    for heading in (
        "Bootstrap intervals", "Collapse: ", "ΔHE against Δmetric", "HE early warning",
        "Run-to-run spread over case orders",
    ):  # fmt: skip
        assert heading in page, heading
    header, rows = interval_table([collapsed])
    assert [r[1] for r in rows] == ["pre-edit", "memit", "alphaedit"]
    assert all(cell.count("[") == 1 for cell in rows[1][2:5])
    assert rows[1][2] in page
    assert "collapse point (edits)" in page and ">3<" in page and NO_COLLAPSE in page
    header, rows = warning_table([collapsed])
    memit = next(r for r in rows if r[1] == "memit")
    assert memit[2] == "3" and memit[6] in ("yes", "no")
    header, rows = spread_table([collapsed, root / "shuffled"])
    assert {r[1] for r in rows} == {"memit", "alphaedit"} and "file, shuffle:1" in rows[0][2]


def test_the_cli_report_prints_the_intervals(study_run, tmp_path):
    root, _ = study_run
    out = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["report", str(root / "file"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "bootstrap intervals" in result.output


def test_old_runs_without_stored_intervals_still_report_them(study_run, tmp_path):
    root, _ = study_run
    copy = tmp_path / "old"
    shutil.copytree(root / "file", copy)
    path = copy / "memit" / "summary.json"
    summary = json.loads(path.read_text())
    stored = summary.pop("intervals")
    path.write_text(json.dumps(summary))
    _, rows = interval_table([copy])
    memit = next(r for r in rows if r[1] == "memit")
    assert memit[2] == format_interval(stored["efficacy"])


def test_general_tasks_reach_the_general_evaluation(monkeypatch):
    seen = {}

    def fake(model, tokenizer, data_dir, n_items, **options):
        seen.update(options, n_items=n_items)
        return {"summary": {}}

    monkeypatch.setattr("sphere_edit.evaluation.general.evaluate_general", fake)
    bench = Benchmark(_config(general_tasks=("gsm8k",), general_items=7), "unused")
    bench._general(SimpleNamespace(model=None, tokenizer=None))
    assert seen == {"tasks": ("gsm8k",), "n_items": 7}
