"""Reliability, second round: the command line against concurrent writers, leftover and
foreign folders, failed exports, ignored options, markup in user text and usage errors
(see docs/reliability.md)."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import PreTrainedModel
from typer.testing import CliRunner

from sphere_edit.cli.app import app
from sphere_edit.cli.editing import _check_edit_options, _report_unconverged
from sphere_edit.common.fileio import RUN_LOCK, RunLockedError, run_lock
from sphere_edit.editing.requests import EditRequest
from sphere_edit.editing.stats import Corpus, CorpusError, collect_second_moments, load_corpus
from sphere_edit.model import loading
from sphere_edit.model.loading import ModelNotFoundError, load_model
from tests import FIXTURES_DIR, REPO_ROOT
from tests.tiny_models import make_tiny_model

runner = CliRunner()
SRC = REPO_ROOT / "src"
GOOD = [
    {"prompt": "{} is located in", "subject": "Toronto", "target_new": "France"},
    {"prompt": "John plays the", "subject": "John", "target_new": "guitar"},
]
MISSING_MODEL = "/no/such/model/folder"
WIDE = {"COLUMNS": "200"}  # help lines unwrapped


@pytest.fixture
def tiny(tmp_path, tiny_tokenizer, monkeypatch) -> SimpleNamespace:
    monkeypatch.setenv("SPHERE_EDIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny-llama"
    make_tiny_model("llama", tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(["Paris is the capital of France. Rome is in Italy."] * 40))
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in GOOD) + "\n")
    return SimpleNamespace(model=folder, corpus=corpus, requests=requests, root=tmp_path)


def _edit(tiny, out: Path, *extra: str, model: str | None = None) -> list[str]:
    return [
        "edit", "--model", model or str(tiny.model), "--requests", str(tiny.requests),
        "--out", str(out), "--method", "memit", "--batch-size", "1", "--layers", "1",
        "--corpus", str(tiny.corpus), "--stats-tokens", "1000", "--steps", "1", *extra,
    ]  # fmt: skip


def _one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    # Progress bars (transformers' weight loading) are not part of the message.
    lines = [line for line in result.output.strip().splitlines() if "it/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


# -- 1: one writer per run directory -------------------------------------------------------

HOLDER = """
import sys, time
from sphere_edit.common.fileio import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_second_writer_is_refused_naming_the_pid_and_a_killed_holder_frees_the_lock(tiny):
    out = tiny.root / "run"
    child_env = {**os.environ, "PYTHONPATH": str(SRC)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], env=child_env, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline().strip() == b"locked"
        line = _one_line_error(runner.invoke(app, _edit(tiny, out)))
        assert f"PID {holder.pid}" in line and "--out" in line
        bench = runner.invoke(app, ["bench", "--out", str(out), "--model", MISSING_MODEL])
        assert f"PID {holder.pid}" in _one_line_error(bench)
        with pytest.raises(RunLockedError), run_lock(out):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    assert holder.returncode == -signal.SIGKILL
    with run_lock(out):  # the OS dropped the killed holder's lock
        assert (out / RUN_LOCK).read_text().strip() == str(os.getpid())


def test_refused_command_leaves_no_folder_and_a_lock_is_reentrant_after_release(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(ValueError), run_lock(out):
        raise ValueError("refused")
    assert not out.exists()
    out.mkdir()
    (out / "kept.txt").write_text("x")
    for _ in range(2):
        with run_lock(out):
            pass
    assert sorted(p.name for p in out.iterdir()) == sorted([RUN_LOCK, "kept.txt"])


def test_run_lock_refuses_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(FileExistsError, match="is a file"), run_lock(path):
        pass


# -- 2, 3: leftover batches and foreign folders ----------------------------------------------


def test_batches_without_index_are_not_overwritten(tiny):
    out = tiny.root / "run"
    (out / "batches").mkdir(parents=True)
    old = out / "batches" / "000001.safetensors"
    old.write_bytes(b"old delta")
    for extra in ([], ["--resume"]):
        line = _one_line_error(runner.invoke(app, _edit(tiny, out, *extra)))
        assert "batches/" in line and "session.json" in line and "move" in line
    assert old.read_bytes() == b"old delta"


def test_resume_into_a_folder_that_is_not_a_run_is_refused(tiny):
    out = tiny.root / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"jpeg")
    line = _one_line_error(runner.invoke(app, _edit(tiny, out, "--resume")))
    assert "not an edit run" in line and "holiday.jpg" in line
    assert sorted(p.name for p in out.iterdir()) == sorted(["holiday.jpg", RUN_LOCK])


def test_out_that_is_a_file_is_refused_before_the_model_loads(tiny):
    out = tiny.root / "file"
    out.write_text("not a folder")
    line = _one_line_error(runner.invoke(app, _edit(tiny, out, model=MISSING_MODEL)))
    assert "--out" in line and "is a file" in line


# -- 4: export -----------------------------------------------------------------------------


def test_export_to_a_file_is_refused_before_the_model_loads(tiny):
    target = tiny.root / "model.bin"
    target.write_text("x")
    out = tiny.root / "run"
    args = _edit(tiny, out, "--export", str(target), model=MISSING_MODEL)
    line = _one_line_error(runner.invoke(app, args))
    assert "--export" in line and "is a file" in line
    assert not out.exists()


def test_failed_export_exits_non_zero_and_leaves_no_folder(tiny, monkeypatch):
    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    target = tiny.root / "exported"
    result = runner.invoke(app, _edit(tiny, tiny.root / "run", "--export", str(target)))
    assert result.exit_code == 2
    assert "No space left on device" in result.output
    assert "edited model saved" not in result.output
    assert sorted(p.name for p in tiny.root.iterdir() if "exported" in p.name) == []


def test_export_follows_the_umask_and_unconverged_requests_are_named(tiny):
    target = tiny.root / "exported"
    old = os.umask(0o027)
    try:
        result = runner.invoke(app, _edit(tiny, tiny.root / "run", "--export", str(target)))
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in target.iterdir()}
    assert modes["model.safetensors"] == 0o640 and set(modes.values()) == {0o640}
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    # One Adam step on a random model leaves every v* far above its tolerance.
    assert "not converged: 'Toronto'" in result.output
    assert "not converged: 'John'" in result.output


def test_unconverged_names_only_losses_above_the_tolerance(capsys):
    batch = [EditRequest.create("{} is in", s, "France") for s in ("A", "B", "C", "D")]
    _report_unconverged(batch, [0.53, 0.05, 0.01, None], 0.05)
    shown = capsys.readouterr().out
    assert "'A'" in shown and "0.53 > tolerance 0.05" in shown
    assert "'B'" not in shown and "'C'" not in shown and "'D'" not in shown


# -- 5: options that were ignored ----------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layers", ""], "--layers: empty"),
        (["--layers", "  "], "--layers: empty"),
        (["--eta", "0.5"], "--eta: a SPHERE option"),
        (["--alpha", "0.5"], "--alpha: a SPHERE option"),
        (["--basis", "pre_edit"], "--basis: a SPHERE option"),
    ],
)
def test_ignored_options_are_refused(tiny, extra, message):
    out = tiny.root / "run"
    args = _edit(tiny, out, model=MISSING_MODEL)
    if extra[0] == "--layers":
        args[args.index("--layers") + 1] = extra[1]
    else:
        args += extra
    assert message in _one_line_error(runner.invoke(app, args))
    assert not out.exists()


def test_sphere_options_pass_the_check_with_sphere():
    spec = SimpleNamespace(sphere=True)
    _check_edit_options(spec, "1", eta=0.5, alpha=0.5, basis="pre_edit")


# -- 6: user text is never markup ----------------------------------------------------------


@pytest.mark.parametrize("subject", ["[/bold]", "[red]X[/red]", "a[b]c"])
def test_markup_in_a_subject_is_printed_as_it_is(tiny, subject):
    tiny.requests.write_text(
        json.dumps({"prompt": "It is in", "subject": subject, "target_new": "France"}) + "\n"
    )
    line = _one_line_error(runner.invoke(app, _edit(tiny, tiny.root / "run")))
    assert repr(subject) in line


@pytest.mark.parametrize("name", ["a[b]c.jsonl", "x[/x].jsonl", "[red]X[/red].jsonl"])
def test_markup_in_a_path_is_printed_as_it_is(tiny, name):
    args = _edit(tiny, tiny.root / "run")
    args[args.index("--requests") + 1] = str(tiny.root / name)
    assert name in _one_line_error(runner.invoke(app, args))


# -- 7: usage errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["edit", "--requests", "r", "--out", "o", "--batch-size", "0"], "--batch-size: "),
        (["edit", "--requests", "r", "--out", "o", "--bogus"], "No such option: --bogus"),
        (["edit", "--requests", "r"], "Missing option '--out'"),
        (["bench", "--n-edits", "x"], "--n-edits: "),
        (["no-such-command"], "No such command"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(args, message):
    assert message in _one_line_error(runner.invoke(app, args))


def test_help_still_works():
    result = runner.invoke(app, ["edit", "--help"])
    assert result.exit_code == 0 and "--requests" in result.output


# -- 8: checked before any model work ------------------------------------------------------


def test_a_folder_that_is_not_a_model_says_what_is_missing(tmp_path, tiny_tokenizer):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json and no tokenizer"):
        load_model(str(empty))
    weights_only = tmp_path / "weights-only"
    make_tiny_model("llama", tiny_tokenizer).save_pretrained(weights_only)
    with pytest.raises(ModelNotFoundError, match="not a saved model: no tokenizer"):
        load_model(str(weights_only))


def test_a_model_that_is_not_local_fails_at_once(monkeypatch):
    with pytest.raises(ModelNotFoundError, match="no such folder.*smollm2-135m"):
        load_model("/no/such/model/folder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE is set.*smollm2-135m"):
        load_model("someone/some-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(loading, "_hub_reachable", lambda: False)
    with pytest.raises(ModelNotFoundError, match="hub cannot be reached.*local folder"):
        load_model("someone/some-model")


def test_a_resume_with_other_statistics_corpus_or_model_is_refused(tiny, tiny_tokenizer):
    out = tiny.root / "run"
    assert runner.invoke(app, _edit(tiny, out)).exit_code == 0
    journal = (out / "session.json").read_bytes()
    args = _edit(tiny, out, "--resume")
    args[args.index("--stats-tokens") + 1] = "2000"
    assert "--stats-tokens: the run" in _one_line_error(runner.invoke(app, args))
    other_corpus = tiny.root / "other.txt"
    other_corpus.write_text("Another text entirely. " * 200)
    args = _edit(tiny, out, "--resume")
    args[args.index("--corpus") + 1] = str(other_corpus)
    assert "--corpus: " in _one_line_error(runner.invoke(app, args))
    other_model = tiny.root / "other-model"
    make_tiny_model("llama", tiny_tokenizer, seed=1).save_pretrained(other_model)
    tiny_tokenizer.save_pretrained(other_model)
    args = _edit(tiny, out, "--resume", model=str(other_model))
    assert "different base model" in _one_line_error(runner.invoke(app, args))
    assert (out / "session.json").read_bytes() == journal


# -- 9: corpus files -----------------------------------------------------------------------


def test_a_corpus_that_is_a_directory_or_not_utf8_is_named(tmp_path):
    with pytest.raises(CorpusError, match=f"corpus {tmp_path} is a directory"):
        load_corpus(str(tmp_path))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Café au lait".encode("latin-1"))
    with pytest.raises(CorpusError, match=f"corpus file {latin} is not UTF-8.*byte 3 is 0xe9"):
        load_corpus(str(latin))


def test_a_corpus_far_smaller_than_asked_warns_with_both_numbers(tiny_tokenizer, caplog):
    text = "Paris is the capital of France."
    corpus = Corpus(texts=[text], fingerprint="f", description="corpus file tiny.txt")
    available = len(tiny_tokenizer(text, add_special_tokens=True)["input_ids"])
    model = make_tiny_model("llama", tiny_tokenizer)
    with caplog.at_level(logging.WARNING, logger="sphere_edit.editing.stats"):
        collect_second_moments(model, tiny_tokenizer, [1], corpus, max_tokens=1000, progress=False)
    assert f"gives {available} tokens, far fewer than the 1000" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sphere_edit.editing.stats"):
        collect_second_moments(
            model, tiny_tokenizer, [1], corpus, max_tokens=2 * available, progress=False
        )
    assert "far fewer" not in caplog.text
    # Text sampled from the model (no corpus given) is as large as its recipe says.
    sampled = Corpus(texts=[text], fingerprint="s", description="sampled", sampled=True)
    with caplog.at_level(logging.WARNING, logger="sphere_edit.editing.stats"):
        collect_second_moments(model, tiny_tokenizer, [1], sampled, max_tokens=1000, progress=False)
    assert "far fewer" not in caplog.text


# -- 12: help ------------------------------------------------------------------------------


def test_help_shows_the_formula_and_no_bool_metavar_on_flags():
    shown = runner.invoke(app, ["stats", "--help"], env=WIDE).output
    assert "E[k kᵀ]" in shown and "--stats-tokens" in shown
    edit_help = runner.invoke(app, ["edit", "--help"], env=WIDE).output
    for flag in ("--resume",):  # --bf16 is now a hidden alias of --precision bf16
        line = next(line for line in edit_help.splitlines() if flag in line)
        assert "<bool>" not in line
    lines = edit_help.splitlines()
    for option in ("--stats-tokens", "--eta", "--alpha", "--lr", "--steps"):
        start = next(i for i, line in enumerate(lines) if f" {option} " in line)
        # The option's help runs on until the next option's line.
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("-")),
            len(lines),
        )
        block = " ".join(lines[start:end])
        assert "Default" in block or "default" in block, block


@pytest.mark.parametrize("name", ["--stats-tokens", "--tokens"])
def test_stats_takes_stats_tokens_and_the_old_tokens(name):
    result = runner.invoke(app, ["stats", "--model", MISSING_MODEL, name, "2000"])
    assert "no such folder" in _one_line_error(result)


def test_markup_in_a_model_folder_name_is_shown_as_it_is(tiny):
    folder = tiny.root / "m[/x]"
    folder.mkdir(parents=True)
    result = runner.invoke(app, _edit(tiny, tiny.root / "run", model=str(folder)))
    assert f"{folder} is not a saved model" in _one_line_error(result)


def test_bench_runs_and_resumes_in_its_locked_directory(tiny):
    out = tiny.root / "bench"
    args = [
        "bench", "--out", str(out), "--model", str(tiny.model), "--methods", "memit",
        "--dataset", str(FIXTURES_DIR / "counterfact_rome.json"), "--n-edits", "1",
        "--batch-size", "1", "--corpus", str(tiny.corpus), "--stats-tokens", "1000",
    ]  # fmt: skip
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert (out / RUN_LOCK).exists() and (out / "summary.json").exists()
    again = runner.invoke(app, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert "complete" in again.output
    # The old spelling, a path after --resume, is one line saying what to give now.
    old = runner.invoke(app, [*args[:1], "--resume", str(out), *args[3:]])
    assert old.exit_code == 2
    assert f"--out {out} --resume" in _one_line_error(old)


@pytest.mark.parametrize("damage", ["deleted", "emptied"])
def test_a_damaged_batch_request_file_is_named_before_the_model_loads(tiny, damage, monkeypatch):
    out = tiny.root / "run"
    assert runner.invoke(app, _edit(tiny, out)).exit_code == 0
    record = out / "batches" / "000001.json"
    if damage == "deleted":
        record.unlink()
    else:
        record.write_text("")

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the journal was checked")

    monkeypatch.setattr("sphere_edit.model.loading.load_model", refuse)
    line = _one_line_error(runner.invoke(app, _edit(tiny, out, "--resume")))
    assert f"batch 1: its request file {record}" in line
    assert ("is missing" if damage == "deleted" else "is empty") in line
