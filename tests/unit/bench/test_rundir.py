"""The benchmark run directory's schema: what a run writes is what the schema names, the
names on disk stay as they are, and a folder that is no run is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sphere_edit.bench.rundir import (
    BenchRunDir,
    MethodDir,
    RunDirError,
    expect_run,
    find_run_kind,
    run_kind,
)
from sphere_edit.bench.runner import BenchConfig, Benchmark
from sphere_edit.cli.app import app
from sphere_edit.editing.journal import INDEX
from sphere_edit.model.loading import LoadedModel
from tests import FIXTURES_DIR
from tests.tiny_models import make_tiny_model

METHODS = ("memit", "memit+sphere")
runner = CliRunner()


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, tiny_tokenizer) -> Path:
    model = make_tiny_model("llama", tiny_tokenizer, seed=0)
    loaded = LoadedModel(model=model, tokenizer=tiny_tokenizer, name="tiny-llama")
    config = BenchConfig(
        model="tiny",
        methods=METHODS,
        dataset=str(FIXTURES_DIR / "counterfact_rome.json"),
        n_edits=2,
        batch_size=1,
        checkpoint_every=1,
        stats_tokens=2000,
    )
    run_dir = tmp_path_factory.mktemp("rundir") / "run"
    Benchmark(config, run_dir, log=lambda _: None, progress=False, loaded=loaded).run()
    return run_dir


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_every_file_of_a_finished_run_is_one_the_schema_names(bench_run):
    layout = BenchRunDir(bench_run)
    assert layout.methods() == list(METHODS)
    unnamed = [p.relative_to(bench_run) for p in _files(bench_run) if not layout.names(p)]
    assert unnamed == []
    missing = [p for p in layout.required_files() if not p.is_file()]
    assert missing == []
    # Each method's journal is an edit run of its own, where the schema says it is.
    for spec in METHODS:
        assert run_kind(layout.method(spec).journal) == "edit"


def test_a_file_the_schema_does_not_name_is_caught(bench_run, tmp_path):
    layout = BenchRunDir(bench_run)
    for stray in ("notes.txt", "memit/extra.json", "pre_edit/he.csv", "plots/other.png"):
        assert not layout.names(bench_run / stray), stray
    # Per-method files belong to configured methods only.
    assert not layout.names(bench_run / "alphaedit" / "summary.json")
    assert layout.names(bench_run / "memit_sphere" / "geometry" / "layer1_angles.png")


def test_the_names_on_disk_are_the_ones_earlier_runs_wrote(tmp_path):
    # Existing run directories must go on reading: these are the names runs have written.
    layout = BenchRunDir(tmp_path)
    found = sorted(str(p.relative_to(tmp_path)) for p in layout.required_files(["rome+sphere"]))
    assert found == sorted(
        [
            "config.json", "progress.json", "summary.json",
            "pre_edit/cases.jsonl", "pre_edit/summary.json",
            "rome_sphere/batches.jsonl", "rome_sphere/he.csv", "rome_sphere/checkpoints.jsonl",
            "rome_sphere/cases.jsonl", "rome_sphere/summary.json", "rome_sphere/progress.json",
            "rome_sphere/journal/session.json",
        ]
    )  # fmt: skip
    method = layout.method("rome+sphere")
    assert method.geometry_summary == tmp_path / "rome_sphere" / "geometry" / "summary.json"
    assert layout.plots == tmp_path / "plots"


def test_energy_rows_read_back_exactly(tmp_path):
    folder = MethodDir(tmp_path / "m")
    rows = [
        {"edits": 0, "layer": 3, "energy": 0.1 + 0.2},
        {"edits": 2, "layer": 4, "energy": 1 / 3},
    ]
    folder.write_energy(rows)
    assert folder.energy.read_text(encoding="utf-8").splitlines()[0] == "edits,layer,energy"
    assert folder.read_energy() == [(0, 3, 0.1 + 0.2), (2, 4, 1 / 3)]


def test_progress_before_the_run_wrote_any(tmp_path):
    assert BenchRunDir(tmp_path).read_progress() == {"pre_edit": False, "methods": {}}
    assert MethodDir(tmp_path / "m").read_progress() == {}
    assert MethodDir(tmp_path / "m").read_checkpoints() == []


def test_run_kind_tells_the_runs_apart(bench_run, tmp_path):
    assert run_kind(bench_run) == "bench"
    edit = tmp_path / "edit"
    edit.mkdir()
    (edit / INDEX).write_text("{}", encoding="utf-8")
    assert run_kind(edit) == "edit"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunDirError, match="holds neither session.json .* nor config.json"):
        run_kind(empty)
    # A model folder has a config.json too, but no benchmark's.
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    with pytest.raises(RunDirError, match="not a benchmark's"):
        run_kind(model)
    assert find_run_kind(model) is None
    assert find_run_kind("smollm2-135m") is None
    with pytest.raises(RunDirError, match="no such folder"):
        run_kind(tmp_path / "absent")


def test_expect_run_says_what_to_give_instead(bench_run, tmp_path):
    assert expect_run(bench_run, "bench") == bench_run
    with pytest.raises(RunDirError, match="benchmark run, not an edit run") as error:
        expect_run(bench_run, "edit")
    assert str(bench_run / "memit" / "journal") in str(error.value)
    journal = BenchRunDir(bench_run).method("memit").journal
    with pytest.raises(RunDirError, match="edit run, not a benchmark run"):
        expect_run(journal, "bench")


@pytest.mark.parametrize(
    "command",
    [
        ["geometry"],
        ["report", "--out", "{tmp}/report.html"],
        ["general", "--edits", "0"],
        ["energy", "--run"],
    ],
)
def test_the_cli_refuses_a_folder_that_is_no_run_in_one_line(command, tmp_path):
    folder = tmp_path / "runs" / "x"
    folder.mkdir(parents=True)
    # The folder goes last: the positional argument, or the value of ``--run``.
    args = [part.format(tmp=tmp_path) for part in command] + [str(folder)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [
        f"error: {folder} is not a run directory: it holds neither session.json (an edit "
        "run) nor config.json (a benchmark run)"
    ]
    assert not (tmp_path / "report.html").exists()


def test_the_cli_refuses_the_other_kind_of_run(bench_run):
    journal = BenchRunDir(bench_run).method("memit").journal
    result = runner.invoke(app, ["report", str(journal), "--out", str(bench_run / "r.html")])
    assert result.exit_code == 2
    assert "is an edit run, not a benchmark run" in " ".join(result.output.split())
    result = runner.invoke(app, ["energy", "--run", str(bench_run)])
    assert result.exit_code == 2
    assert "is a benchmark run, not an edit run" in " ".join(result.output.split())
