"""The command line on a tiny model saved to disk: a real edit run, and one-line errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sphere_edit.cli.app import app

runner = CliRunner()


def _requests(tmp_path, records):
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


GOOD = [
    {"prompt": "{} is located in", "subject": "Toronto", "target_new": "France"},
    {"prompt": "John plays the", "subject": "John", "target_new": "guitar"},
]


def test_edit_run_writes_a_journal_and_energy_reads_it(tiny_dir, tmp_path):
    folder, corpus = tiny_dir
    out = tmp_path / "run"
    args = [
        "edit", "--model", str(folder), "--requests", str(_requests(tmp_path, GOOD)),
        "--out", str(out), "--method", "memit+sphere", "--batch-size", "1", "--layers", "1,2",
        "--corpus", str(corpus), "--stats-tokens", "1000", "--steps", "2",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    index = json.loads((out / "session.json").read_text())
    assert len(index["batches"]) == 2
    assert index["method_spec"] == "memit+sphere"
    shown = runner.invoke(app, ["energy", "--run", str(out)])
    assert shown.exit_code == 0 and "layer 1" in shown.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "bogus"], "unknown method"),
        (["--layers", "9"], "out of range"),
        (["--eta", "1.5"], "--eta"),
        (["--alpha", "-0.1"], "--alpha"),
        (["--batch-size", "0"], "batch-size"),
        (["--device", "tpu"], "--device: 'tpu'"),
        (["--device", "cuda:99"], "--device: 'cuda:99'"),
        (["--device", "cpu", "--device-map", "auto"], "--device and --device-map both"),
        (["--device-map", "nowhere.json"], "--device-map: 'nowhere.json' is neither auto"),
    ],
)
def test_bad_options_give_one_line_errors(tiny_dir, tmp_path, extra, message):
    folder, corpus = tiny_dir
    args = [
        "edit", "--model", str(folder), "--requests", str(_requests(tmp_path, GOOD)),
        "--out", str(tmp_path / "run"), "--corpus", str(corpus), *extra,
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "session.json").exists()


def test_bad_request_file_names_the_record_and_field(tiny_dir, tmp_path):
    folder, corpus = tiny_dir
    bad = [GOOD[0], {"prompt": "{} plays the", "subject": "Mary", "target_new": ""}]
    args = [
        "edit", "--model", str(folder), "--requests", str(_requests(tmp_path, bad)),
        "--out", str(tmp_path / "run"), "--corpus", str(corpus),
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "request 1" in result.output and "target_new" in result.output


def test_edit_over_a_device_map_file_journals_what_a_run_without_it_does(tiny_dir, tmp_path):
    folder, corpus = tiny_dir
    entries = ["model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head"]
    entries += [f"model.layers.{i}" for i in range(4)]
    device_map = tmp_path / "map.json"
    device_map.write_text(json.dumps(dict.fromkeys(entries, "cpu")))
    journals = []
    for name, extra in (("plain", []), ("mapped", ["--device-map", str(device_map)])):
        out = tmp_path / name
        args = [
            "edit", "--model", str(folder), "--requests", str(_requests(tmp_path, GOOD)),
            "--out", str(out), "--method", "memit", "--batch-size", "2", "--layers", "1,2",
            "--corpus", str(corpus), "--stats-tokens", "1000", "--steps", "2", *extra,
        ]  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        journals.append(json.loads((out / "session.json").read_text())["batches"])
    assert "device map: 8 modules: cpu ×8" in result.output
    assert all(b["delta_sha256"] for b in journals[0])
    assert [b["delta_sha256"] for b in journals[0]] == [b["delta_sha256"] for b in journals[1]]
