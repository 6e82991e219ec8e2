"""The command line as a user reads it: whole option names and defaults at 80 columns,
and a data error before the model loads."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from sphere_edit.cli.app import app
from tests import FIXTURES_DIR

runner = CliRunner()
COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def _shown_default(param: typer.core.TyperOption) -> str | None:
    if not getattr(param, "show_default", True) or param.default in (None, ()):
        return None
    if param.is_flag and param.secondary_opts:
        names = param.opts if param.default else param.secondary_opts
        return names[0].lstrip("-")
    return str(param.default)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_at_80_columns_shows_every_option_name_and_default_whole(name):
    result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in result.output
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    options = [p for p in command.params if isinstance(p, typer.core.TyperOption) and not p.hidden]
    assert options
    for param in options:
        if param.hidden:  # an old name kept for scripts: not shown, by design
            continue
        for opt in param.opts + param.secondary_opts:
            # Whole: the name followed by a space, a comma or the end of the line.
            assert any(f" {opt} " in f" {line} " or f" {opt}," in f" {line}" for line in lines), opt
        default = _shown_default(param)
        if default is not None:
            assert any(default in line for line in lines), (param.name, default)


def _broken_data(tmp_path) -> str:
    records = json.loads((FIXTURES_DIR / "counterfact_flat.json").read_text())
    del records[1]["target_new"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(records))
    return str(path)


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr("sphere_edit.model.loading.load_model", refuse)


def test_bench_data_error_comes_before_the_model_load(tmp_path, no_model_load):
    args = ["bench", "--out", str(tmp_path / "run"), "--dataset", _broken_data(tmp_path),
            "--n-edits", "3", "--methods", "memit"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "the model was loaded" not in message
    assert "record 1 (counting from 0" in message
    assert "field 'target_new'" in message
    assert "--skip-invalid" in message
    assert not (tmp_path / "run").exists()


def test_bench_too_few_cases_come_before_the_model_load(tmp_path, no_model_load):
    args = ["bench", "--out", str(tmp_path / "run"), "--dataset", _broken_data(tmp_path),
            "--n-edits", "1000", "--methods", "memit", "--skip-invalid"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "the model was loaded" not in message
    assert "--n-edits" in message and "fewer than 1000" in message


@pytest.mark.parametrize(
    "command",
    [
        ["stats", "--model", "smollm2-135m"],
        ["energy", "--model", "smollm2-135m"],
        ["demo", "--model", "smollm2-135m"],
        ["bench", "--n-edits", "2", "--methods", "memit"],
    ],
)
def test_a_bad_preset_file_fails_before_the_model_load(tmp_path, no_model_load, command):
    bad = tmp_path / "hparams.yaml"
    fixture = FIXTURES_DIR / "easyedit_alphaedit_llama3-8b.yaml"
    bad.write_text(fixture.read_text() + "mom2_update_rank: 5\n")
    if command[0] == "bench":
        command = [*command, "--out", str(tmp_path / "run"),
                   "--dataset", str(FIXTURES_DIR / "counterfact_rome.json")]  # fmt: skip
    result = runner.invoke(app, [*command, "--preset", str(bad)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "the model was loaded" not in message
    assert "mom2_update_rank" in message
