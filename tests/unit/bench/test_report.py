"""The report as a user reads it, on a tiny benchmark run: the probability-comparison
columns, per-dataset labels, why a cell is "–", shared v*, grouped headers, HE change."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from typer.testing import CliRunner

from sphere_edit.bench.plots import energy_change, scale_exponent
from sphere_edit.bench.report import build_report, group_runs, legend, missing_reasons, table
from sphere_edit.bench.runner import BenchConfig, Benchmark
from sphere_edit.cli.app import app
from sphere_edit.model.loading import LoadedModel
from tests import FIXTURES_DIR
from tests.tiny_models import make_tiny_model

PROBABILITY = {
    "Eff.P": "rewrite_prob_success",
    "Gen.P": "paraphrase_prob_success",
    "Spe.P": "neighborhood_prob_success",
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_tokenizer):
    model = make_tiny_model("llama", tiny_tokenizer, seed=0)
    loaded = LoadedModel(model=model, tokenizer=tiny_tokenizer, name="tiny-llama")
    config = BenchConfig(
        model="tiny", methods=("memit", "alphaedit"),
        dataset=str(FIXTURES_DIR / "counterfact_rome.json"), n_edits=2, batch_size=2,
        checkpoint_every=2, stats_tokens=2000, fluency_cases=1,
    )  # fmt: skip
    run_dir = tmp_path_factory.mktemp("report") / "run"
    summary = Benchmark(config, run_dir, log=lambda _: None, progress=False, loaded=loaded).run()
    return run_dir, summary


def _edit(run_dir, tmp_path, name, change):
    """A copy of the run whose summary.json (and config.json) ``change`` rewrites."""
    copy = tmp_path / name
    shutil.copytree(run_dir, copy)
    summary = json.loads((copy / "summary.json").read_text())
    config = json.loads((copy / "config.json").read_text())
    change(summary, config)
    (copy / "summary.json").write_text(json.dumps(summary))
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def _all_metrics(summary):
    yield summary["pre_edit"]["metrics"]
    for method in summary["methods"].values():
        yield method["final"]["metrics"]


def test_probability_comparison_columns_come_from_summary_json(tiny_run):
    run_dir, summary = tiny_run
    groups, header, rows = table([run_dir])
    by_name = {r[0]: r for r in rows}
    finals = {"pre-edit": summary["pre_edit"]["metrics"]}
    finals.update({m: s["final"]["metrics"] for m, s in summary["methods"].items()})
    for label, key in PROBABILITY.items():
        column = header.index(f"{groups[0]} {label}")
        for name, metrics in finals.items():
            assert by_name[name][column] == f"{100 * metrics[key]:.2f}", (name, label)
    assert header[-2].endswith("Flu.") and header[-1].endswith("Consis.")


def test_html_groups_the_header_and_labels_counterfact_metrics(tiny_run):
    run_dir, summary = tiny_run
    page = build_report([run_dir])
    label = f"tiny-llama {summary['dataset']} (n=2)"
    assert page.count(f"<th colspan='9' class='group'>{label}</th>") == 1
    assert f"<th>{label} Eff.</th>" not in page  # the label only once, over its columns
    assert "<th>Eff.P</th>" in page and "<th>Spe.P</th>" in page
    assert "P(new) &gt; P(old)" in page and "P(true) &gt; P(new)" in page
    assert "every token of the expected target the argmax" in page


def test_a_shared_vstar_is_named_instead_of_its_time(tiny_run):
    run_dir, _ = tiny_run
    page = build_report([run_dir])
    assert "<td>v* shared with memit</td>" in page  # alphaedit, one batch
    assert page.count("v* shared with") == 2  # that cell and the note explaining it


def test_the_journal_decides_whether_batch_one_took_a_shared_vstar(tiny_run, tmp_path):
    """A method resumed in a new process computed its own v* of batch 1: its journal
    says so, and the report must not name an owner; a journal from before the record
    falls back to the v* keys."""
    from sphere_edit.bench.plots import read_run
    from sphere_edit.bench.report import shared_vstar
    from sphere_edit.bench.rundir import BenchRunDir
    from sphere_edit.editing.journal import Journal

    run_dir, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    journal = Journal(BenchRunDir(copy).method("alphaedit").journal)
    entry = journal.index()["batches"][0]
    path = journal.run_dir / entry["requests_file"]
    record = json.loads(path.read_text())
    assert record["vstar_given"] is True
    run = read_run(copy)
    assert shared_vstar(run, copy) == {"alphaedit": "memit"}
    path.write_text(json.dumps({**record, "vstar_given": False}))
    assert shared_vstar(run, copy) == {}
    path.write_text(json.dumps({k: v for k, v in record.items() if k != "vstar_given"}))
    assert shared_vstar(run, copy) == {"alphaedit": "memit"}


def test_dashes_say_why(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    # The fixture has no reference snippets: consistency cannot be measured.
    reasons = missing_reasons(next(iter(group_runs([run_dir]).values())))
    assert reasons == ["Consis. –: no reference snippets for this data"]

    def no_generation(summary, config):
        config["config"]["fluency_cases"] = 0
        for metrics in _all_metrics(summary):
            for key in ("fluency", "consistency", "ngram_entropy"):
                metrics.pop(key, None)

    quiet = _edit(run_dir, tmp_path, "quiet", no_generation)
    reasons = missing_reasons(next(iter(group_runs([quiet]).values())))
    assert reasons == [
        "Flu. –: not run (--fluency-cases 0)",
        "Consis. –: not run (--fluency-cases 0)",
    ]
    page = build_report([quiet])
    assert "Flu. –: not run (--fluency-cases 0)." in page
    # Two checkpoints are too few for a rank correlation.
    assert "– (too few checkpoints)" in page


@pytest.mark.parametrize("has_top1", [False, True])
def test_zsre_metrics_are_labelled_token_accuracies(tiny_run, tmp_path, has_top1):
    run_dir, _ = tiny_run

    def as_zsre(summary, config):
        summary["dataset"] = "zsre"
        for metrics in _all_metrics(summary):
            for key in list(metrics):
                if key.endswith("_prob_success") or (key.endswith("_top1") and not has_top1):
                    del metrics[key]

    zsre = _edit(run_dir, tmp_path, f"zsre{has_top1}", as_zsre)
    group = next(iter(group_runs([zsre]).values()))
    text = legend(group)
    assert "token-level accuracy" in text
    assert "every token of the expected target the argmax" not in text
    if has_top1:
        pre = group["summary"]["pre_edit"]["metrics"]
        assert f"rewrite_top1 {100 * pre['rewrite_top1']:.2f}" in text
    else:
        assert "Whole-target top-1 is not in summary.json" in text
    assert "Eff.P –: zsRE has no probability comparison (one target per prompt)" in (
        missing_reasons(group)
    )


def test_terminal_table_shows_the_new_columns_and_reasons(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    result = CliRunner().invoke(
        app, ["report", str(run_dir), "--out", str(tmp_path / "r.html")], env={"COLUMNS": "160"}
    )
    assert result.exit_code == 0, result.output
    for label in ("Eff.P", "Gen.P", "Spe.P", "Flu.", "Consis."):
        assert label in result.output
    assert "Consis. –: no reference snippets for this data" in result.output


def test_energy_is_plotted_as_its_change_from_pre_edit():
    energy = {0: 0.7073, 10: 0.70732, 20: 0.707305}
    change = energy_change(energy)
    assert change[0] == 0.0
    assert change[10] == pytest.approx(2e-5) and change[20] == pytest.approx(5e-6)
    assert scale_exponent(list(change.values())) == -5
    assert scale_exponent([-0.03, 0.002]) == -2
    assert scale_exponent([250.0]) == 2
    assert scale_exponent([0.0]) == 0 and scale_exponent([]) == 0
    assert scale_exponent([math.inf]) == 0
    assert energy_change({}) == {}


def test_summary_holds_no_untimed_fields(tiny_run):
    run_dir, summary = tiny_run
    # The model was handed in loaded: this run did not load it, so it times no load.
    assert "load_model_seconds" not in json.loads((run_dir / "summary.json").read_text())
    for method in ("memit", "alphaedit"):
        for line in (run_dir / method / "batches.jsonl").read_text().splitlines():
            timings = json.loads(line)["timings"]
            assert "context" not in timings and "targets" in timings
