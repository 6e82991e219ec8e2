"""General-ability curves from a run's journal (``general --edits``): each point is the
model after exactly the batches up to it, unreachable counts are refused, stored points
are not measured again, the passed model gets its weights back; the shared plot."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from sphere_edit.bench.plots import _plot_general
from sphere_edit.cli.app import app
from sphere_edit.evaluation import general
from sphere_edit.evaluation.general import general_curve
from sphere_edit.model.loading import LoadedModel, load_model
from tests import FIXTURES_DIR
from tests.tiny_models import make_tiny_model
from tests.unit._helpers import (
    THREE_BATCHES,
    assert_weights_equal,
    saved_memit_session,
    weights_copy,
)

FIXTURES = FIXTURES_DIR / "general"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = [1, 2]
# THREE_BATCHES: the model can be rebuilt at 0, 2, 3 and 5 edits.
BATCHES = THREE_BATCHES
EVAL = {"data_dir": FIXTURES, "n_items": 2, "tasks": "rte,boolq"}


@pytest.fixture(scope="module")
def run(tiny_tokenizer, tmp_path_factory):
    """Three MEMIT batches on a tiny llama saved to a folder (so the CLI can load it by
    the name the journal records); the weights after 0, 1, 2 and 3 batches."""
    directory = tmp_path_factory.mktemp("curve")
    folder, loaded, session = saved_memit_session(directory, tiny_tokenizer, "llama", LAYERS)
    run_dir = session.run_dir
    snapshots = [weights_copy(loaded)]
    for batch in BATCHES:
        session.apply(batch)
        snapshots.append(weights_copy(loaded))
    return SimpleNamespace(folder=folder, run_dir=run_dir, snapshots=snapshots)


@pytest.fixture
def spy(monkeypatch):
    """Records the model's weights at every general-ability evaluation (then evaluates)."""
    seen: list[dict[str, torch.Tensor]] = []
    real = general.evaluate_general

    def recording(model, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(general.curve, "evaluate_general", recording)
    return seen


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "seconds"}
    return value


def _same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)


def test_each_point_is_the_model_after_exactly_its_batches(run, spy, tmp_path):
    base = load_model(str(run.folder))
    out = tmp_path / "curve.json"
    curve = general_curve(run.run_dir, [5, 0, 2], model=base, out=out, **EVAL)
    assert [p["edits"] for p in curve["points"]] == [0, 2, 5]
    assert [p["batches"] for p in curve["points"]] == [0, 1, 3]
    # Evaluated in order, on weights bitwise equal to the session's after those batches.
    assert len(spy) == 3
    for seen, batches in zip(spy, [0, 1, 3], strict=True):
        assert _same_weights(seen, run.snapshots[batches]), batches
    assert not _same_weights(spy[1], run.snapshots[0])  # the edits changed something
    # The passed model comes back unedited.
    assert_weights_equal(base, run.snapshots[0])
    # Each point is what a single evaluation of that model gives.
    reference = LoadedModel(make_tiny_model("llama", base.tokenizer), base.tokenizer, "ref")
    for point in curve["points"]:
        reference.model.load_state_dict(run.snapshots[point["batches"]])
        alone = general.evaluate_general(reference.model, reference.tokenizer, **EVAL)
        assert _without_timings(point) == _without_timings(
            {"edits": point["edits"], "batches": point["batches"], **alone}
        )
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(curve))
    assert {k: saved[k] for k in ("run_dir", "model", "n_items", "tasks")} == {
        "run_dir": str(run.run_dir), "model": str(run.folder), "n_items": 2,
        "tasks": ["rte", "boolq"],
    }  # fmt: skip


@pytest.mark.parametrize("edits", [[1], [0, 4], [6], []])
def test_counts_off_a_batch_end_are_refused_with_the_reachable_ones(run, spy, edits):
    base = load_model(str(run.folder))
    with pytest.raises(ValueError, match=r"^--edits: .*are 0, 2, 3, 5$"):
        general_curve(run.run_dir, edits, model=base, **EVAL)
    assert not spy
    assert_weights_equal(base, run.snapshots[0])


def test_stored_points_are_not_measured_again(run, spy, tmp_path):
    out = tmp_path / "curve.json"
    base = load_model(str(run.folder))
    first = general_curve(run.run_dir, [0, 3], model=base, out=out, **EVAL)
    assert len(spy) == 2
    spy.clear()
    second = general_curve(run.run_dir, [0, 2, 3, 5], model=base, out=out, **EVAL)
    # Only 2 and 5 are evaluated, each on the right weights; 0 and 3 are kept as stored.
    assert len(spy) == 2
    assert _same_weights(spy[0], run.snapshots[1]) and _same_weights(spy[1], run.snapshots[3])
    assert [p["edits"] for p in second["points"]] == [0, 2, 3, 5]
    assert second["points"][0] == first["points"][0] and second["points"][2] == first["points"][1]
    assert json.loads(out.read_text()) == json.loads(json.dumps(second))
    assert_weights_equal(base, run.snapshots[0])
    # All points stored: nothing is evaluated and no model is even loaded.
    spy.clear()
    again = general_curve(run.run_dir, [2, 5], model=str(run.folder / "nowhere"), out=out, **EVAL)
    assert not spy and len(again["points"]) == 4
    # A file measured with other settings is refused, not mixed in.
    with pytest.raises(ValueError, match="n_items 2, not 3"):
        general_curve(run.run_dir, [0], model=base, out=out, **{**EVAL, "n_items": 3})
    with pytest.raises(ValueError, match="tasks"):
        general_curve(run.run_dir, [0], model=base, out=out, **{**EVAL, "tasks": "rte"})


def test_an_interrupted_curve_keeps_its_points_and_restores_the_model(run, monkeypatch, tmp_path):
    real = general.evaluate_general
    calls = []

    def fails_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(general.curve, "evaluate_general", fails_second)
    out = tmp_path / "curve.json"
    base = load_model(str(run.folder))
    with pytest.raises(KeyboardInterrupt):
        general_curve(run.run_dir, [2, 5], model=base, out=out, **EVAL)
    assert [p["edits"] for p in json.loads(out.read_text())["points"]] == [2]
    assert_weights_equal(base, run.snapshots[0])


def test_cli_curve_table_json_and_plot(run, tmp_path, monkeypatch):
    monkeypatch.setenv("SPHERE_EDIT_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    out = tmp_path / "curve.json"
    args = ["general", str(run.run_dir), "--edits", "0,3", "--data", str(FIXTURES),
            "--n-items", "2", "--tasks", "boolq", "--out", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "boolq_loglik_acc" in result.output and "boolq_generate_acc" in result.output
    assert [p["edits"] for p in json.loads(out.read_text())["points"]] == [0, 3]
    assert (tmp_path / "curve.png").read_bytes().startswith(PNG_MAGIC)

    bad = runner.invoke(app, [*args[:3], "1", *args[4:]])
    assert bad.exit_code == 2 and "--edits: 1 not at a batch end" in bad.output
    assert "0, 2, 3, 5" in bad.output
    words = runner.invoke(app, [*args[:3], "0,all", *args[4:]])
    assert words.exit_code == 2 and "comma-separated integers" in words.output
    not_run = runner.invoke(app, ["general", str(run.folder), "--edits", "0"])
    assert not_run.exit_code == 2 and "run directory" in not_run.output
    no_edits = runner.invoke(app, ["general", str(run.run_dir), "--plot", str(tmp_path / "p.png")])
    assert no_edits.exit_code == 2 and "give --edits too" in no_edits.output


def test_benchmark_general_plot_uses_the_shared_plot(tmp_path):
    rows = [{"edits": 2, "summary": {"rte_loglik_acc": 0.5, "rte_generate_invalid": 2}}]
    run = {
        "summary": {"pre_edit": {"general": {"summary": {"rte_loglik_acc": 1.0}}}},
        "methods": {"memit": {"summary": {"general": rows}}, "ft": {"summary": None}},
    }
    path = _plot_general(run, tmp_path / "general.png")
    assert path is not None and path.read_bytes().startswith(PNG_MAGIC)
    no_general = {**run, "methods": {"ft": {"summary": None}}}
    assert _plot_general(no_general, tmp_path / "none.png") is None
