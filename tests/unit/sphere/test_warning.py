"""The HE early-warning rule on synthetic series: a jump fires, steady noise does not,
the warm-up is respected, and the threshold is k times the median earlier change."""

from __future__ import annotations

import random
import statistics

import pytest

from sphere_edit.sphere.warning import DEFAULT_K, DEFAULT_WARMUP, EnergyWarning


def _feed(rule: EnergyWarning, series: list[dict[int, float]]) -> list:
    return [alarm for changes in series for alarm in rule.update(changes)]


def test_a_jump_fires_naming_layer_change_and_threshold():
    rng = random.Random(0)
    steady = [{3: rng.uniform(0.9, 1.1) * 1e-4, 4: rng.uniform(0.9, 1.1) * 1e-4} for _ in range(8)]
    rule = EnergyWarning(k=5, warmup=5)
    assert _feed(rule, steady) == []
    alarms = rule.update({3: 1e-4, 4: -2e-3})  # layer 4 drops twenty times the usual
    assert len(alarms) == 1
    alarm = alarms[0]
    earlier = [abs(s[4]) for s in steady]
    assert (alarm.batch, alarm.layer, alarm.change) == (9, 4, -2e-3)
    assert alarm.threshold == pytest.approx(5 * statistics.median(earlier))
    assert "layer 4" in alarm.message() and "-2.000e-03" in alarm.message()


def test_steady_noise_does_not_fire():
    rng = random.Random(1)
    series = [{layer: rng.gauss(1e-3, 2e-4) for layer in range(4)} for _ in range(200)]
    assert _feed(EnergyWarning(), series) == []


def test_the_warm_up_is_respected():
    rule = EnergyWarning(k=2, warmup=3)
    # Batches 2 and 3 jump, but fewer than 3 earlier changes exist: no alarm yet.
    assert _feed(rule, [{0: 1.0}, {0: 100.0}, {0: 1000.0}]) == []
    assert _feed(rule, [{0: 1.0}]) == []  # median of 1, 100, 1000 is 100
    fired = rule.update({0: 201.0})
    assert [a.batch for a in fired] == [5] and fired[0].threshold == 2 * statistics.median(
        [1.0, 100.0, 1000.0, 1.0]
    )


def test_a_change_at_the_threshold_does_not_fire():
    rule = EnergyWarning(k=3, warmup=2)
    _feed(rule, [{1: 1.0}, {1: -1.0}])
    assert rule.update({1: 3.0}) == []
    assert len(rule.update({1: 3.5})) == 1  # the median of 1, 1, 3 is 1: threshold 3


def test_defaults_and_bad_settings():
    assert (EnergyWarning().k, EnergyWarning().warmup) == (DEFAULT_K, DEFAULT_WARMUP)
    with pytest.raises(ValueError, match="k must be positive"):
        EnergyWarning(k=0)
    with pytest.raises(ValueError, match="warmup"):
        EnergyWarning(warmup=0)


def test_edit_prints_and_records_alarms(tmp_path, tiny_tokenizer, monkeypatch):
    import json

    from typer.testing import CliRunner

    from sphere_edit.cli.app import app
    from tests.tiny_models import make_tiny_model

    monkeypatch.setenv("SPHERE_EDIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny-llama"
    make_tiny_model("llama", tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(["Paris is the capital of France. Rome is in Italy."] * 40))
    subjects = ["Toronto", "Lyon", "Oslo", "Kyoto", "Quito", "Turin", "Perth"]
    requests = tmp_path / "requests.jsonl"
    requests.write_text(
        "".join(
            json.dumps({"prompt": "{} is located in", "subject": s, "target_new": "France"}) + "\n"
            for s in subjects
        )
    )
    out = tmp_path / "run"
    args = [
        "edit", "--model", str(folder), "--requests", str(requests), "--out", str(out),
        "--method", "memit", "--batch-size", "1", "--layers", "1,2", "--corpus", str(corpus),
        "--stats-tokens", "1000", "--steps", "2", "--he-warning", "1e-12",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "he_warnings.jsonl").open()]
    # The first alarm can only come after the warm-up of DEFAULT_WARMUP batches.
    assert rows and min(r["batch"] for r in rows) > DEFAULT_WARMUP
    assert {r["layer"] for r in rows} <= {1, 2}
    assert "HE warning: batch" in result.output
    bad = CliRunner().invoke(app, [*args[:-1], "-1"])
    assert bad.exit_code != 0 and "--he-warning" in bad.output
