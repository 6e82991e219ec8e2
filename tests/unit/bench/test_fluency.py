"""Fluency measured after a run equals what the benchmark measured during it."""

from __future__ import annotations

import pytest

from sphere_edit.bench.fluency import measure_fluency
from sphere_edit.bench.runner import BenchConfig, Benchmark
from sphere_edit.model.loading import LoadedModel
from tests import FIXTURES_DIR
from tests.tiny_models import make_tiny_model


def _tiny(tokenizer):
    model = make_tiny_model("llama", tokenizer, seed=0)
    return LoadedModel(model=model, tokenizer=tokenizer, name="tiny-llama")


def test_after_the_run_equals_the_benchmarks_own(tmp_path, tiny_tokenizer):
    config = BenchConfig(
        model="tiny", methods=("memit",), dataset=str(FIXTURES_DIR / "counterfact_rome.json"),
        n_edits=2, batch_size=1, checkpoint_every=2, stats_tokens=2000, fluency_cases=2, seed=3,
    )  # fmt: skip
    run_dir = tmp_path / "run"
    summary = Benchmark(
        config, run_dir, log=lambda _: None, progress=False, loaded=_tiny(tiny_tokenizer)
    ).run()
    final = summary["methods"]["memit"]["final"]["metrics"]
    after = measure_fluency(run_dir, "memit", cases=2, model=_tiny(tiny_tokenizer))
    assert (after["batches"], after["edits"], after["cases"]) == (2, 2, 2)
    assert after["fluency"] == pytest.approx(final["fluency"], rel=1e-9)
    base = measure_fluency(run_dir, "memit", cases=2, base=True, model=_tiny(tiny_tokenizer))
    assert base["fluency"] == pytest.approx(summary["pre_edit"]["metrics"]["fluency"], rel=1e-9)
    assert base["fluency"] != pytest.approx(after["fluency"], rel=1e-9)  # the edits show


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="not a benchmark run"):
        measure_fluency(tmp_path, "memit")
    with pytest.raises(ValueError, match="cases: 0 is below 1"):
        measure_fluency(tmp_path, "memit", cases=0)
