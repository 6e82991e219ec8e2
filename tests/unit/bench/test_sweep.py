"""The sweep over SPHERE options on a tiny model: grid, table, plot, resume."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from sphere_edit.bench import sweep as sweep_module
from sphere_edit.bench.rundir import BenchRunDir, read_jsonl
from sphere_edit.bench.runner import BenchConfig, Benchmark
from sphere_edit.bench.sweep import (
    ROWS_FILE,
    TABLE_FILE,
    SweepError,
    grid_specs,
    parse_grid,
    run_sweep,
)
from sphere_edit.cli.app import app
from sphere_edit.editing.journal import Journal
from sphere_edit.model.loading import LoadedModel
from tests import FIXTURES_DIR
from tests.tiny_models import make_tiny_model


def _config() -> BenchConfig:
    return BenchConfig(
        model="tiny",
        methods=("memit+sphere",),
        dataset=str(FIXTURES_DIR / "counterfact_rome.json"),
        n_edits=2,
        batch_size=1,
        stats_tokens=2000,
    )


def test_grid_is_the_cartesian_product_of_checked_values():
    grid = parse_grid(["alpha=0.3,0.5", "basis=current,pre_edit"])
    assert grid_specs("memit+sphere", grid) == [
        "memit+sphere:alpha=0.3:basis=current",
        "memit+sphere:alpha=0.3:basis=pre_edit",
        "memit+sphere:alpha=0.5:basis=current",
        "memit+sphere:alpha=0.5:basis=pre_edit",
    ]
    with pytest.raises(SweepError, match="grid: cannot parse 'gamma=1'"):
        parse_grid(["gamma=1"])
    with pytest.raises(SweepError, match="no SPHERE suffix"):
        grid_specs("memit", grid)
    with pytest.raises(ValueError, match="alpha .* must be a number"):
        grid_specs("memit+sphere", {"alpha": ["x"]})


def test_sweep_writes_its_table_and_resumes(tmp_path, tiny_tokenizer, monkeypatch):
    model = make_tiny_model("llama", tiny_tokenizer, seed=0)
    loaded = LoadedModel(model=model, tokenizer=tiny_tokenizer, name="tiny-llama")
    out = tmp_path / "sweep"
    grid = {"alpha": ["0.0", "1.0"]}
    options = dict(loaded=loaded, log=lambda _: None, progress=False)
    rows = run_sweep(_config(), "memit+sphere-solve", grid, out, **options)
    assert [r["alpha"] for r in rows] == [0.0, 1.0]
    assert read_jsonl(out / ROWS_FILE) == json.loads(json.dumps(rows))
    table = (out / TABLE_FILE).read_text().splitlines()
    assert table[0].startswith("| spec | Eff | Gen | Spe | mean ΔHE")
    assert table[2].startswith("| memit+sphere-solve:alpha=0.0 |")
    assert (out / "sweep.png").stat().st_size > 0
    assert all(0 <= r["efficacy"] <= 1 and r["seconds"] > 0 for r in rows)
    # α = 0 is no projection at all; α = 1 removes the update's part along U entirely,
    # so the two points edit differently.
    assert rows[0]["he_change"] != rows[1]["he_change"]

    with pytest.raises(SweepError, match="not empty"):
        run_sweep(_config(), "memit+sphere-solve", grid, out, **options)
    with pytest.raises(SweepError, match="other options"):
        run_sweep(_config(), "memit+sphere-solve", {"alpha": ["0.5"]}, out, resume=True, **options)

    # Resuming a finished sweep runs nothing again and gives the same rows.
    def refuse(*_args, **_kwargs):
        raise AssertionError("a finished point was run again")

    monkeypatch.setattr(sweep_module.Benchmark, "_run_method", refuse)
    again = run_sweep(_config(), "memit+sphere-solve", grid, out, resume=True, **options)
    assert [r["spec"] for r in again] == [r["spec"] for r in rows]
    assert [r["efficacy"] for r in again] == [r["efficacy"] for r in rows]


def _delta_hashes(run_dir, spec: str) -> list[str]:
    journal = Journal(BenchRunDir(run_dir).method(spec).journal)
    return [entry["delta_sha256"] for entry in journal.index()["batches"]]


def test_the_first_batch_v_star_is_computed_once_and_changes_nothing(tmp_path, tiny_tokenizer):
    """The second point reuses the first point's v* of batch 1; run alone it computes its
    own, and its journal holds the same deltas, bitwise."""
    model = make_tiny_model("llama", tiny_tokenizer, seed=0)
    loaded = LoadedModel(model=model, tokenizer=tiny_tokenizer, name="tiny-llama")
    logs: list[str] = []
    grid = {"alpha": ["0.3", "0.8"]}
    run_sweep(_config(), "memit+sphere", grid, tmp_path / "sweep", loaded=loaded,
              log=logs.append, progress=False)  # fmt: skip
    shared = [line for line in logs if "v* of batch 1 shared" in line]
    assert len(shared) == 1 and shared[0].startswith("memit+sphere:alpha=0.8:")

    alone_logs: list[str] = []
    alone = tmp_path / "alone"
    config = replace(_config(), methods=("memit+sphere:alpha=0.8",))
    Benchmark(config, alone, log=alone_logs.append, progress=False, loaded=loaded).run()
    assert not any("shared" in line for line in alone_logs)
    spec = "memit+sphere:alpha=0.8"
    assert _delta_hashes(alone, spec) == _delta_hashes(tmp_path / "sweep" / "point-001", spec)


def test_cli_sweep_rejects_a_bad_grid_in_one_line(tmp_path):
    out = tmp_path / "x"
    args = ["sweep", "--out", str(out), "--method", "memit+sphere", "--grid", "gamma=1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert "grid: cannot parse 'gamma=1'" in result.output
    assert "Traceback" not in result.output
    assert not out.exists() or not any(p.name != ".sphere-edit.lock" for p in out.iterdir())


def test_cli_sweep_checks_its_precision_before_the_model_loads(tmp_path):
    out = tmp_path / "x"
    args = ["sweep", "--out", str(out), "--method", "alphaedit+sphere", "--grid", "alpha=0.5",
            "--model", str(tmp_path / "no-such-model"), "--precision", "fp16"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert "--precision: unknown value 'fp16'" in result.output
    assert "Traceback" not in result.output
