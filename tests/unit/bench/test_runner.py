"""The sequential benchmark on a tiny model: run directory, protocols, correlations, report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr
from typer.testing import CliRunner

from sphere_edit.bench.geometry import geometry_for_bench
from sphere_edit.bench.report import build_report, table
from sphere_edit.bench.runner import BenchConfig, Benchmark
from sphere_edit.cli.app import app
from sphere_edit.model.loading import LoadedModel
from tests import FIXTURES_DIR
from tests.tiny_models import make_tiny_model

FIXTURES = FIXTURES_DIR


def _config(**overrides) -> BenchConfig:
    options = dict(
        model="tiny",
        methods=("memit", "memit+sphere"),
        dataset=str(FIXTURES / "counterfact_rome.json"),
        n_edits=3,
        batch_size=1,
        checkpoint_every=1,
        stats_tokens=2000,
    )
    options.update(overrides)
    return BenchConfig(**options)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"checkpoint_every": 3, "batch_size": 2}, "checkpoint_every"),
        ({"n_edits": 0}, "n_edits"),
        ({"batch_size": 0}, "batch_size"),
        ({"methods": ("memit", "bogus")}, "method"),
        ({"methods": ()}, "methods"),
        ({"methods": ("memit", "memit")}, "methods"),
        ({"general_every": 5, "batch_size": 2, "checkpoint_every": 2}, "general_every"),
        ({"precision": "auto"}, "precision"),
        ({"repeats": "skip"}, "repeats"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        _config(**overrides)


def test_checkpoints_fall_on_batch_ends_and_always_include_the_last():
    config = _config(n_edits=1000, batch_size=100, checkpoint_every=200)
    assert config.checkpoints() == [200, 400, 600, 800, 1000]
    assert _config(n_edits=250, batch_size=100, checkpoint_every=None).checkpoints() == [250]
    assert _config(n_edits=250, batch_size=50, checkpoint_every=100).checkpoints() == [
        100,
        200,
        250,
    ]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_tokenizer):
    model = make_tiny_model("llama", tiny_tokenizer, seed=0)
    loaded = LoadedModel(model=model, tokenizer=tiny_tokenizer, name="tiny-llama")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    run_dir = tmp_path_factory.mktemp("bench") / "run"
    summary = Benchmark(_config(), run_dir, log=lambda _: None, progress=False, loaded=loaded).run()
    return run_dir, summary, loaded, base


def test_run_directory_holds_every_file(finished_run):
    run_dir, summary, _, _ = finished_run
    for name in ("config.json", "summary.json", "pre_edit/cases.jsonl", "pre_edit/summary.json"):
        assert (run_dir / name).is_file(), name
    for method in ("memit", "memit_sphere"):
        folder = run_dir / method
        for name in ("batches.jsonl", "he.csv", "checkpoints.jsonl", "cases.jsonl"):
            assert (folder / name).is_file(), f"{method}/{name}"
        assert (folder / "journal" / "session.json").is_file()
        cases = (folder / "cases.jsonl").read_text().splitlines()
        assert len(cases) == 3
        checkpoints = [json.loads(line) for line in (folder / "checkpoints.jsonl").open()]
        assert [c["edits"] for c in checkpoints] == [1, 2, 3]
        assert [c["metrics"]["n_cases"] for c in checkpoints] == [1, 2, 3]
        he_rows = (folder / "he.csv").read_text().splitlines()
        assert he_rows[0] == "edits,layer,energy"
        layers = summary["methods"][method.replace("_", "+")]["layers"]
        assert len(he_rows) - 1 == 4 * len(layers)  # edits 0, 1, 2, 3
    assert (run_dir / "plots" / "metrics.png").stat().st_size > 1000
    assert (run_dir / "plots" / "he_differences.png").is_file()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["environment"]["torch"] == torch.__version__
    assert set(config["protocols"]) == {"final", "checkpoint"}


def test_every_method_starts_from_the_base_model_and_the_model_is_restored(finished_run):
    run_dir, summary, loaded, base = finished_run
    firsts = []
    for method in ("memit", "memit_sphere"):
        first = json.loads((run_dir / method / "batches.jsonl").open().readline())
        firsts.append(first["energy_before"])
    assert firsts[0] == firsts[1]
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, base[name]), name
    # The projection changed the update: the two methods' final energies differ.
    finals = [summary["methods"][m]["energy_final"] for m in ("memit", "memit+sphere")]
    assert finals[0] != finals[1]


def test_final_protocol_equals_the_last_checkpoint(finished_run):
    _, summary, _, _ = finished_run
    for method in summary["methods"].values():
        final = method["final"]["metrics"]
        last = method["checkpoints"][-1]["metrics"]
        for key in ("efficacy", "generalization", "specificity"):
            assert final[key] == last[key]
        assert method["final"]["protocol"] == "final"


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_correlations_match_scipy(finished_run):
    run_dir, summary, _, _ = finished_run
    method = summary["methods"]["memit"]
    rows = [line.split(",") for line in (run_dir / "memit" / "he.csv").read_text().splitlines()]
    energy: dict[int, list[float]] = {}
    for edits, _, value in rows[1:]:
        energy.setdefault(int(edits), []).append(float(value))
    he = [sum(energy[c["edits"]]) / len(energy[c["edits"]]) for c in method["checkpoints"]]
    for metric in ("efficacy", "specificity"):
        series = [c["metrics"][metric] for c in method["checkpoints"]]
        expected = spearmanr(he, series).statistic
        got = method["correlations"][metric]["spearman"]
        if expected != expected:  # NaN: a constant series
            assert got is None
        else:
            assert got == pytest.approx(expected)


def test_report_is_one_self_contained_page(finished_run, tmp_path):
    run_dir, _, _, _ = finished_run
    page = build_report([run_dir])
    assert page.startswith("<!doctype html>")
    assert "data:image/png;base64," in page
    assert "memit+sphere" in page
    _, header, rows = table([run_dir])
    assert header[0] == "method" and any("Eff." in h for h in header)
    assert [r[0] for r in rows] == ["pre-edit", "memit", "memit+sphere"]
    result = CliRunner().invoke(app, ["report", str(run_dir), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.html").read_text().startswith("<!doctype html>")


def test_a_used_run_directory_is_refused(finished_run, tiny_tokenizer):
    run_dir, _, loaded, _ = finished_run
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(FileExistsError, match="not empty"):
        Benchmark(_config(), run_dir, log=lambda _: None, progress=False, loaded=loaded).run()
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_cli_bench_rejects_bad_options_in_one_line(tmp_path):
    result = CliRunner().invoke(
        app,
        ["bench", "--out", str(tmp_path / "x"), "--batch-size", "30", "--checkpoint-every", "50"],
    )
    assert result.exit_code == 2
    assert "checkpoint_every" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_report_merges_runs_of_one_dataset_into_one_column_group(finished_run, tmp_path):
    run_dir, _, _, _ = finished_run
    twin = tmp_path / "twin"
    shutil.copytree(run_dir, twin)
    groups, header, rows = table([run_dir, twin])
    assert len(groups) == 1
    assert len(header) == 1 + 9  # method, then Edits and the eight metrics once
    assert [r[0] for r in rows] == [
        "pre-edit",
        "memit",
        "memit+sphere",
        "memit (twin)",
        "memit+sphere (twin)",
    ]
    assert rows[1][1:] == rows[3][1:]


def test_report_shows_a_run_in_progress_at_its_latest_checkpoint(finished_run, tmp_path):
    run_dir, summary, _, _ = finished_run
    running = tmp_path / "running"
    shutil.copytree(run_dir, running)
    # As the run leaves it while memit+sphere is on its third batch.
    top = json.loads((running / "summary.json").read_text())
    del top["methods"]["memit+sphere"]
    del top["wall_seconds"]
    (running / "summary.json").write_text(json.dumps(top))
    lines = (running / "memit_sphere" / "checkpoints.jsonl").read_text().splitlines()
    (running / "memit_sphere" / "checkpoints.jsonl").write_text("\n".join(lines[:2]) + "\n")
    _, header, rows = table([running])
    by_name = {r[0]: r for r in rows}
    assert by_name["memit"][1] == "3"
    assert by_name["memit+sphere"][1] == "2*"
    second = summary["methods"]["memit+sphere"]["checkpoints"][1]["metrics"]
    eff = header.index(next(h for h in header if h.endswith("Eff.")))
    assert by_name["memit+sphere"][eff] == f"{100 * second['efficacy']:.2f}"
    assert by_name["memit+sphere"][header.index(header[-2])] == "–"  # no fluency yet
    shutil.rmtree(running / "plots")  # a run in progress has no figures yet
    page = build_report([running])
    assert "in progress" in page and "data:image/png;base64," in page
    assert not (running / "plots").exists()  # the report writes nothing into a run


def test_pre_edit_results_are_reused_from_a_matching_run(finished_run, tmp_path, monkeypatch):
    source, _, loaded, _ = finished_run

    def refuse(*_args, **_kwargs):
        raise AssertionError("the pre-edit model was evaluated again")

    monkeypatch.setattr(Benchmark, "_pre_edit", refuse)
    run_dir = tmp_path / "second"
    config = _config(methods=("memit",), n_edits=1)
    with pytest.raises(ValueError, match="--pre-edit-from: n_edits differs"):
        Benchmark(config, run_dir, log=lambda _: None, progress=False, loaded=loaded,
                  pre_edit_from=source).run()  # fmt: skip
    with pytest.raises(ValueError, match="--pre-edit-from: .* not a benchmark run"):
        Benchmark(_config(methods=("memit",)), run_dir, log=lambda _: None, progress=False,
                  loaded=loaded, pre_edit_from=tmp_path).run()  # fmt: skip
    assert not run_dir.exists()  # a refused run leaves no folder
    summary = Benchmark(
        _config(methods=("memit",)),
        run_dir,
        log=lambda _: None,
        progress=False,
        loaded=loaded,
        pre_edit_from=source,
    ).run()
    for name in ("cases.jsonl", "summary.json"):
        assert (run_dir / "pre_edit" / name).read_bytes() == (
            source / "pre_edit" / name
        ).read_bytes()
    assert summary["pre_edit"] == json.loads((source / "pre_edit" / "summary.json").read_text())


def test_geometry_of_every_method_of_a_run_lands_in_the_report(finished_run, tmp_path):
    source, _, loaded, base = finished_run
    run_dir = tmp_path / "geo"
    shutil.copytree(source, run_dir)
    summaries = geometry_for_bench(run_dir, max_neurons=16, model=loaded, tsne=False)
    assert set(summaries) == {"memit", "memit+sphere"}
    for spec, summary in summaries.items():
        folder = run_dir / spec.replace("+", "_") / "geometry"
        assert json.loads((folder / "summary.json").read_text()) == json.loads(json.dumps(summary))
        assert summary["n_batches"] == 3
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, base[name]), name
    page = build_report([run_dir])
    assert "Weight geometry: memit+sphere" in page and "Weight geometry: memit<" in page


@pytest.mark.parametrize(("option", "recorded"), [(None, 256), (0, None), (7, 7)])
def test_positions_per_pass_reaches_the_session(finished_run, tmp_path, option, recorded):
    """None keeps the library default, 0 turns the cap off, a number sets it; the journal
    header records what the session used."""
    source, _, loaded, _ = finished_run
    run_dir = tmp_path / "run"
    config = _config(methods=("memit",), positions_per_pass=option)
    Benchmark(config, run_dir, log=lambda _: None, progress=False, loaded=loaded,
              pre_edit_from=source).run()  # fmt: skip
    header = json.loads((run_dir / "memit" / "journal" / "session.json").read_text())
    assert header["target"]["positions_per_pass"] == recorded


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_reaches_the_session(finished_run, tmp_path, precision):
    """The configured (resolved) precision is the v* and key passes' arithmetic, recorded
    in the journal header, from which a resumed run takes it."""
    source, _, loaded, _ = finished_run
    run_dir = tmp_path / "run"
    config = _config(methods=("memit",), precision=precision, n_edits=1)
    Benchmark(config, run_dir, log=lambda _: None, progress=False, loaded=loaded,
              pre_edit_from=None).run()  # fmt: skip
    header = json.loads((run_dir / "memit" / "journal" / "session.json").read_text())
    assert header["target"]["bf16"] is (precision == "bf16")
    from sphere_edit.cli.benchmark import _recorded_precision

    assert _recorded_precision(run_dir) == precision
    assert _recorded_precision(tmp_path / "nothing") is None


def test_plugin_table_pairs_each_method_with_its_sphere_variant(finished_run, tmp_path):
    from sphere_edit.bench.report import plugin_table, relative_change

    assert relative_change(0.5, 0.6) == pytest.approx(0.2)
    assert relative_change(0.0, 0.6) is None
    assert relative_change(None, 0.6) is None
    run_dir, summary, _, _ = finished_run
    header, rows = plugin_table([run_dir])
    assert [row[1] for row in rows] == ["memit"]  # memit+sphere is its pair, not a row
    assert header[3:6] == ["Eff.", "Eff. +SPHERE", "Eff. change %"]
    plain = summary["methods"]["memit"]["final"]["metrics"]
    projected = summary["methods"]["memit+sphere"]["final"]["metrics"]
    for i, key in zip(range(3, len(header), 3), ("efficacy", "generalization"), strict=False):
        assert rows[0][i] == f"{100 * plain[key]:.2f}"
        assert rows[0][i + 1] == f"{100 * projected[key]:.2f}"
        change = relative_change(plain[key], projected[key])
        assert rows[0][i + 2] == ("–" if change is None else f"{100 * change:+.1f}")
    page = build_report([run_dir])
    assert "SPHERE as a plug-in" in page


def test_first_batch_v_star_is_shared_and_changes_nothing(finished_run, tmp_path):
    """In the finished run memit+sphere reused memit's v* of batch 1; run alone it computes
    its own: the journals must hold the same deltas, bitwise."""
    run_dir, _, loaded, _ = finished_run
    logs: list[str] = []
    alone = tmp_path / "alone"
    Benchmark(_config(methods=("memit+sphere",)), alone, log=logs.append, progress=False,
              loaded=loaded, pre_edit_from=run_dir).run()  # fmt: skip
    assert not any("shared" in line for line in logs)

    def deltas(root: Path) -> list[str]:
        index = json.loads((root / "memit_sphere" / "journal" / "session.json").read_text())
        return [entry["delta_sha256"] for entry in index["batches"]]

    assert deltas(alone) == deltas(run_dir)
    shared = [json.loads(line) for line in (run_dir / "memit_sphere" / "batches.jsonl").open()]
    own = [json.loads(line) for line in (alone / "memit_sphere" / "batches.jsonl").open()]
    assert shared[0]["target_loss_mean"] == own[0]["target_loss_mean"]
    assert shared[0]["timings"]["targets"] < own[0]["timings"]["targets"]


def test_a_batch_with_contradicting_requests_is_refused_before_anything_runs(
    tmp_path, tiny_tokenizer
):
    records = json.loads((FIXTURES / "counterfact_rome.json").read_text())[:3]
    twin = json.loads(json.dumps(records[0]))
    twin["requested_rewrite"]["target_new"]["str"] = "violin"
    twin["case_id"] = 9999
    dataset = tmp_path / "contradicting.json"
    dataset.write_text(json.dumps([*records[:2], twin]))
    model = make_tiny_model("llama", tiny_tokenizer, seed=0)
    loaded = LoadedModel(model=model, tokenizer=tiny_tokenizer, name="tiny-llama")
    run_dir = tmp_path / "run"
    config = _config(dataset=str(dataset), batch_size=3, checkpoint_every=3)
    refused = r"dataset: batch 1 \(cases 0-2 in edit order\).*contradicts.*--repeats edit"
    with pytest.raises(ValueError, match=refused):
        Benchmark(config, run_dir, log=lambda _: None, progress=False, loaded=loaded).run()
    assert not run_dir.exists()

    # Edited together, as the authors' code does: the run goes through and names the pair.
    logs: list[str] = []
    config = _config(
        dataset=str(dataset), batch_size=3, checkpoint_every=3, methods=("memit",),
        repeats="edit",
    )  # fmt: skip
    summary = Benchmark(config, run_dir, log=logs.append, progress=False, loaded=loaded).run()
    pair = [records[0]["case_id"], 9999]
    assert summary["repeats"] == {"policy": "edit", "case_pairs": [pair]}
    assert any(f"cases {pair[0]} and 9999" in line for line in logs)
    assert len(summary["methods"]["memit"]["final"]["metrics"]) > 0


def test_a_run_that_refused_repeats_resumes_editing_them(finished_run, tmp_path):
    """refuse → edit on resume is accepted (a refusing run edited no batch with a repeat);
    edit → refuse is not: the journal may hold such a batch."""
    run_dir, _, loaded, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    again = Benchmark(_config(repeats="edit"), copy, log=lambda _: None, progress=False,
                      loaded=loaded, resume=True).run()  # fmt: skip
    assert again["repeats"]["policy"] == "edit"
    config = json.loads((copy / "config.json").read_text())
    config["config"]["repeats"] = "edit"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="--resume: repeats differs"):
        Benchmark(_config(), copy, log=lambda _: None, progress=False, loaded=loaded,
                  resume=True).run()  # fmt: skip


def test_a_resumed_run_may_change_the_he_warning(finished_run, tmp_path):
    """The rule watches the edits and changes none, so a run started without it (as every
    run before it was on by default) resumes with it, and the other way round."""
    run_dir, _, loaded, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["config"]["he_warning"] = None
    (copy / "config.json").write_text(json.dumps(config))
    for k in (10.0, 0.0):
        again = Benchmark(_config(he_warning=k), copy, log=lambda _: None, progress=False,
                          loaded=loaded, resume=True).run()  # fmt: skip
        assert again["methods"]
