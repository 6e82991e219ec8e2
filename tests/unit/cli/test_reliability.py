"""Reliability: runs killed at named points and resumed, damaged journals and caches,
numerical guards, and hostile input (see docs/reliability.md)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

from sphere_edit.bench.runner import BenchConfig, Benchmark
from sphere_edit.cli.app import app
from sphere_edit.common import faults
from sphere_edit.common.linalg import IllConditionedWarning, solve
from sphere_edit.editing.journal import JournalError, read_index
from sphere_edit.editing.requests import EditRequest, RequestError, load_requests, validate_batch
from sphere_edit.editing.session import EditSession, NumericalError
from sphere_edit.editing.stats import Corpus, layer_second_moments
from sphere_edit.editing.vstar import VStarConfig
from sphere_edit.evaluation.data import DatasetError, load_cases
from sphere_edit.methods import MEMIT, ROME, AlphaEdit
from sphere_edit.methods.base import LayerState
from sphere_edit.model.loading import LoadedModel, load_model
from tests import FIXTURES_DIR, REPO_ROOT
from tests.tiny_models import TRAINING_SENTENCES, make_tiny_model

FIXTURES = FIXTURES_DIR
SRC = REPO_ROOT / "src"
REQUESTS = [
    {"prompt": "{} is located in", "subject": "Toronto", "target_new": "France"},
    {"prompt": "{} plays the", "subject": "Glenn Gould", "target_new": "guitar"},
    {"prompt": "The mother tongue of {} is", "subject": "Marie Curie", "target_new": "English"},
]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_tokenizer):
    """A tiny llama saved as an ordinary checkpoint, a corpus file and a private cache."""
    root = tmp_path_factory.mktemp("reliability")
    model_dir = root / "model"
    make_tiny_model("llama", tiny_tokenizer, seed=0).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(TRAINING_SENTENCES), encoding="utf-8")
    requests = root / "requests.json"
    requests.write_text(json.dumps(REQUESTS), encoding="utf-8")
    old = os.environ.get("SPHERE_EDIT_CACHE")
    os.environ["SPHERE_EDIT_CACHE"] = str(root / "cache")
    yield SimpleNamespace(root=root, model=model_dir, corpus=corpus, requests=requests)
    if old is None:
        del os.environ["SPHERE_EDIT_CACHE"]
    else:
        os.environ["SPHERE_EDIT_CACHE"] = old


# -- killed and resumed -------------------------------------------------------------------


def _config(env) -> BenchConfig:
    return BenchConfig(
        model=str(env.model),
        methods=("memit", "alphaedit+sphere"),
        dataset=str(FIXTURES / "counterfact_rome.json"),
        n_edits=3,
        batch_size=1,
        checkpoint_every=1,
        corpus=str(env.corpus),
        stats_tokens=2000,
    )


def _bench(env, run_dir: Path, resume: bool) -> dict:
    loaded = load_model(str(env.model))
    bench = Benchmark(
        _config(env), run_dir, log=lambda _: None, progress=False, loaded=loaded, resume=resume
    )
    return bench.run()


def _child(fault: str, fn, *args) -> None:
    os.environ[faults.ENV] = fault
    faults._hits.clear()
    fn(*args)


def _killed(fault: str, fn, *args) -> int:
    """Run ``fn`` in a forked process with ``fault`` armed; its exit code (-9: killed)."""
    process = multiprocessing.get_context("fork").Process(target=_child, args=(fault, fn, *args))
    process.start()
    process.join(120)
    return process.exitcode


def _observe(run_dir: Path) -> dict:
    """What the run directory holds: journaled batches and recorded batches per method."""
    seen = {}
    for method in ("memit", "alphaedit_sphere"):
        index = run_dir / method / "journal" / "session.json"
        journal = len(read_index(index.parent)["batches"]) if index.exists() else 0
        rows = run_dir / method / "batches.jsonl"
        record = len(rows.read_text().splitlines()) if rows.exists() else 0
        seen[method] = (journal, record)
    return seen


def _stable(value):
    """A summary without wall-clock numbers and memory use."""
    unstable = ("timings", "peak_rss_mib")
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if "seconds" not in k and k not in unstable}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _jsonl(path: Path) -> list:
    return [_stable(json.loads(line)) for line in path.read_text().splitlines()]


# Each kill continues the run the kill before it left (a chain of resumes).
KILLS = [
    ("vstar:5", {"memit": (0, 0), "alphaedit_sphere": (0, 0)}),
    ("journal-tensors:2", {"memit": (1, 1), "alphaedit_sphere": (0, 0)}),
    ("layer:3", {"memit": (2, 2), "alphaedit_sphere": (0, 0)}),
    ("bench-record:2", {"memit": (3, 3), "alphaedit_sphere": (1, 0)}),
    ("atomic-rename:4", {"memit": (3, 3), "alphaedit_sphere": (1, 0)}),
]


def test_killed_bench_resumes_to_the_uninterrupted_result(env):
    baseline = env.root / "uninterrupted"
    expected = _bench(env, baseline, resume=False)
    run_dir = env.root / "killed"
    observed = []
    for number, (fault, _state) in enumerate(KILLS):
        code = _killed(fault, _bench, env, run_dir, number > 0)
        observed.append((fault, code, _observe(run_dir)))
    print(json.dumps(observed))  # the table of docs/reliability.md
    for (fault, state), (_, code, seen) in zip(KILLS, observed, strict=True):
        assert code == -signal.SIGKILL, fault
        assert seen == state, fault
    assert list(run_dir.glob("**/.*.tmp")), "the rename kill leaves its temporary file"
    summary = _bench(env, run_dir, resume=True)

    assert _stable(summary) == _stable(expected)
    for method in ("memit", "alphaedit_sphere"):
        got, want = run_dir / method, baseline / method
        # Equal chained state fingerprints: every delta file is bitwise the same.
        chain = [read_index(d / "journal")["batches"] for d in (got, want)]
        assert [e["state_after"] for e in chain[0]] == [e["state_after"] for e in chain[1]]
        for name in ("batches.jsonl", "checkpoints.jsonl", "cases.jsonl"):
            assert _jsonl(got / name) == _jsonl(want / name), f"{method}/{name}"
        assert (got / "he.csv").read_text() == (want / "he.csv").read_text()
    # A finished run resumes to itself without editing anything.
    again = _bench(env, run_dir, resume=True)
    assert _stable(again) == _stable(expected)


def test_resume_with_other_options_names_the_field(env, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = _config(env)
    (run_dir / "config.json").write_text(json.dumps({"config": {**config.__dict__, "seed": 1}}))
    before = sorted(run_dir.iterdir())
    with pytest.raises(ValueError, match="seed differs"):
        Benchmark(config, run_dir, log=lambda _: None, progress=False, resume=True).run()
    assert sorted(run_dir.iterdir()) == before


def _edit_args(env, out: Path) -> list[str]:
    return [
        "edit", "--requests", str(env.requests), "--out", str(out), "--model", str(env.model),
        "--method", "memit", "--batch-size", "1", "--corpus", str(env.corpus),
        "--stats-tokens", "2000", "--steps", "5",
    ]  # fmt: skip


def test_killed_edit_command_resumes_bitwise(env):
    """The real command line in a subprocess, killed after batch 2's files were written
    and before the index named them; the resumed run matches an uninterrupted one."""
    whole = env.root / "edit-whole"
    result = CliRunner().invoke(app, _edit_args(env, whole))
    assert result.exit_code == 0, result.output
    out = env.root / "edit-killed"
    child_env = {
        **os.environ,
        faults.ENV: "journal-index:2",
        "PYTHONPATH": str(SRC),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "sphere_edit", *_edit_args(env, out)]
    process = subprocess.run(command, env=child_env, capture_output=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-2000:]
    assert len(read_index(out)["batches"]) == 1
    assert (out / "batches" / "000002.safetensors").exists()  # written, not journaled

    refused = CliRunner().invoke(app, _edit_args(env, out))
    assert refused.exit_code == 2 and "--resume" in refused.output
    resumed = CliRunner().invoke(app, [*_edit_args(env, out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resumed: 1 of 3 batches" in resumed.output
    got, want = read_index(out)["batches"], read_index(whole)["batches"]
    assert [e["state_after"] for e in got] == [e["state_after"] for e in want]
    for a, b in zip(got, want, strict=True):
        ta, tb = load_file(str(out / a["tensors_file"])), load_file(str(whole / b["tensors_file"]))
        assert all(torch.equal(ta[k], tb[k]) for k in tb)


# -- damaged journals and caches -----------------------------------------------------------

TARGET = VStarConfig(steps=2)
BATCHES = [
    [EditRequest.create("{} is located in", "Toronto", "France")],
    [EditRequest.create("{} plays the", "Glenn Gould", "guitar")],
]


def _loaded(tokenizer, seed: int = 0) -> LoadedModel:
    return LoadedModel(make_tiny_model("llama", tokenizer, seed=seed), tokenizer, "tiny")


def _session(loaded, run_dir=None, method=None, moments=None) -> EditSession:
    moments = moments or {layer: torch.eye(128, dtype=torch.float64) for layer in (1, 2)}
    return EditSession(
        loaded,
        method or MEMIT(mom2_weight=1.0),
        [1, 2],
        moments,
        target=TARGET,
        templates=["{}"],
        run_dir=run_dir,
    )


@pytest.fixture(scope="module")
def journals(tiny_tokenizer, tmp_path_factory):
    """Two-batch journals of the same edits on two different base models."""
    root = tmp_path_factory.mktemp("journals")
    for seed in (0, 1):
        session = _session(_loaded(tiny_tokenizer, seed), root / f"model{seed}")
        for batch in BATCHES:
            session.apply(batch)
    return root


def _load(tokenizer, run_dir: Path, seed: int = 0):
    """Load a journal that must be refused; the model is left as it came."""
    loaded = _loaded(tokenizer, seed)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    moments = {layer: torch.eye(128, dtype=torch.float64) for layer in (1, 2)}
    try:
        EditSession.load(run_dir, loaded, MEMIT(mom2_weight=1.0), moments)
    finally:
        assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in before.items())


def _damage(journals, tmp_path, how: str) -> Path:
    run_dir = tmp_path / "copy"
    shutil.copytree(journals / "model0", run_dir)
    index = read_index(run_dir)
    path = run_dir / index["batches"][1]["tensors_file"]
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "foreign-batch":
        # A batch file of the other model's journal, with the index made to agree with it.
        foreign = journals / "model1" / index["batches"][1]["tensors_file"]
        shutil.copy(foreign, path)
        theirs = read_index(journals / "model1")["batches"][1]
        index["batches"][1].update(
            {
                k: theirs[k]
                for k in ("tensors_sha256", "tensors_bytes", "delta_sha256", "state_before")
            }
        )
        (run_dir / "session.json").write_text(json.dumps(index))
    elif how == "reordered":
        first, second = index["batches"]
        first["index"], second["index"] = 2, 1
        index["batches"] = [second, first]
        (run_dir / "session.json").write_text(json.dumps(index))
    return run_dir


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("flip", r"batch 2: .* is corrupted \(SHA-256"),
        ("truncate", r"batch 2: .* is truncated \(\d+ bytes, journal says \d+\)"),
        ("foreign-batch", r"batch 2: applies to edit state .*, but the batches before it"),
        ("reordered", r"batch 1: applies to edit state .*, but the batches before it"),
    ],
)
def test_damaged_journal_is_refused(journals, tiny_tokenizer, tmp_path, how, message):
    run_dir = _damage(journals, tmp_path, how)
    with pytest.raises(JournalError, match=message):
        _load(tiny_tokenizer, run_dir)


def test_batch_file_of_another_model_is_refused(journals, tiny_tokenizer, tmp_path):
    """Index and chain made to agree: the file's own metadata still names its model."""
    run_dir = _damage(journals, tmp_path, "foreign-batch")
    index = read_index(run_dir)
    index["batches"][1].pop("state_before")
    (run_dir / "session.json").write_text(json.dumps(index))
    with pytest.raises(JournalError, match="written for another base model"):
        _load(tiny_tokenizer, run_dir)


def test_journal_of_another_model_is_refused(journals, tiny_tokenizer):
    with pytest.raises(JournalError, match="different base model"):
        _load(tiny_tokenizer, journals / "model1", seed=0)
    # ... and resuming onto another model too, with nothing written.
    loaded = _loaded(tiny_tokenizer, 0)
    run_dir = journals / "model1"
    before = (run_dir / "session.json").read_text()
    with pytest.raises(JournalError, match="different base model"):
        _session(loaded, run_dir).resume()
    assert (run_dir / "session.json").read_text() == before


def test_resume_with_another_method_option_names_it(journals, tiny_tokenizer):
    session = _session(_loaded(tiny_tokenizer), journals / "model0", method=MEMIT(2.0))
    with pytest.raises(JournalError, match="method differs"):
        session.resume()


def test_journal_from_before_a_new_target_setting_resumes(journals, tiny_tokenizer, tmp_path):
    """A journal whose header predates a VStarConfig field resumes with its default;
    a stored value that differs is still refused."""
    run_dir = tmp_path / "old"
    shutil.copytree(journals / "model0", run_dir)
    index = read_index(run_dir)
    index["target"].pop("positions_per_pass")
    (run_dir / "session.json").write_text(json.dumps(index))
    assert _session(_loaded(tiny_tokenizer), run_dir).resume() == len(BATCHES)
    index["target"]["steps"] += 1
    (run_dir / "session.json").write_text(json.dumps(index))
    with pytest.raises(JournalError, match="target differs"):
        _session(_loaded(tiny_tokenizer), run_dir).resume()


def test_statistics_cache_checks(env, tiny_tokenizer, caplog):
    loaded = _loaded(tiny_tokenizer)
    one = Corpus(list(TRAINING_SENTENCES[:30]), "a" * 64, "corpus one")
    two = Corpus(list(TRAINING_SENTENCES[30:]), "b" * 64, "corpus two")
    first = layer_second_moments(loaded, [1], one, max_tokens=1000, progress=False)
    fresh = layer_second_moments(loaded, [1], two, max_tokens=1000, progress=False)
    cache = Path(os.environ["SPHERE_EDIT_CACHE"]) / "stats" / loaded.fingerprint[:16]
    file_one = next((cache / ("a" * 16)).glob("layer1-*"))
    file_two = next((cache / ("b" * 16)).glob("layer1-*"))
    # Corpus one's statistics where corpus two's belong: refused, recomputed.
    shutil.copy(file_one, file_two)
    with caplog.at_level(logging.WARNING, logger="sphere_edit.editing.stats"):
        again = layer_second_moments(loaded, [1], two, max_tokens=1000, progress=False)
    assert "does not match (['corpus'])" in caplog.text
    assert torch.equal(again[1].total, fresh[1].total)
    assert not torch.equal(again[1].total, first[1].total)
    # A flipped byte in the tensor data: the checksum catches it.
    caplog.clear()
    data = bytearray(file_one.read_bytes())
    data[-9] ^= 0x40
    file_one.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="sphere_edit.editing.stats"):
        again = layer_second_moments(loaded, [1], one, max_tokens=1000, progress=False)
    assert "is corrupted (checksum differs)" in caplog.text
    assert torch.equal(again[1].total, first[1].total)


# -- numerical guards ----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["target", "key"])
def test_non_finite_values_reject_the_batch_naming_the_request(
    tiny_tokenizer, tmp_path, monkeypatch, where
):
    import sphere_edit.editing.session as session_module

    loaded = _loaded(tiny_tokenizer)
    session = _session(loaded, tmp_path / "run")
    session.apply(BATCHES[0])
    weights = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    index = (tmp_path / "run" / "session.json").read_text()
    if where == "target":
        real = session_module.compute_vstar

        def poisoned(*args, **kwargs):
            result = real(*args, **kwargs)
            result.vectors[1, 3] = float("nan")
            return result

        monkeypatch.setattr(session_module, "compute_vstar", poisoned)
    else:
        import sphere_edit.editing.routes as routes_module

        real = routes_module.read_layer

        def poisoned(*args, **kwargs):
            readout = real(*args, **kwargs)
            readout.keys[1, 0] = float("inf")
            return readout

        monkeypatch.setattr(routes_module, "read_layer", poisoned)
    batch = [EditRequest.create("{} plays", "Lionel Messi", "hockey"), *BATCHES[1]]
    with pytest.raises(NumericalError, match=r"request\(s\) 1 \('Glenn Gould'\)"):
        session.apply(batch)
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in weights.items())
    assert (tmp_path / "run" / "session.json").read_text() == index
    assert not (tmp_path / "run" / "batches" / "000002.safetensors").exists()
    assert len(session.batches) == 1


def test_solve_falls_back_on_a_singular_system():
    a = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0], [2.0], [0.5]], dtype=torch.float64)
    with pytest.warns(IllConditionedWarning, match="test system is ill-conditioned"):
        x = solve(a, b, what="test system")
    assert torch.allclose(x, torch.linalg.pinv(a) @ b, atol=1e-10)
    good = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    rhs = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(solve(good, rhs), torch.linalg.solve(good, rhs))


@pytest.mark.parametrize("method", [MEMIT(mom2_weight=1.0), AlphaEdit(l2=0.0), ROME()])
def test_singular_edit_systems_are_solved_and_reported(tiny_tokenizer, tmp_path, method):
    """C0 of rank 64 out of 128 (and no regulariser): every method's system is singular."""
    loaded = _loaded(tiny_tokenizer)
    layers = [2] if isinstance(method, ROME) else [1, 2]
    half = torch.diag(torch.cat([torch.ones(64), torch.zeros(64)])).double()
    moments = {layer: half for layer in layers}
    session = EditSession(
        loaded, method, layers, moments, target=TARGET, templates=["{}"], run_dir=tmp_path
    )
    with pytest.warns(IllConditionedWarning):
        result = session.apply(BATCHES[0])
    assert result.warnings and "solved by least squares" in result.warnings[0]
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())
    record = json.loads((tmp_path / "batches" / "000001.json").read_text())
    assert record["warnings"] == result.warnings


def test_layer_state_solvers_are_unchanged_when_well_conditioned():
    state = LayerState(1, "w", torch.zeros(3, 4), torch.eye(4, dtype=torch.float64) * 2,
                       torch.zeros(4, 4, dtype=torch.float64))  # fmt: skip
    keys, residuals = torch.randn(2, 4), torch.randn(2, 3)
    k, r = keys.double().T, residuals.double().T
    want = r @ torch.linalg.solve(2.0 * state.second_moment + k @ k.T, k).T
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = MEMIT(mom2_weight=2.0).update(keys, residuals, state)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


# -- hostile input -------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELD_VALUES = (
    JSON_VALUES
    | st.sampled_from(["", "   ", "{}", "{} {}", "x" * 2001, "\ud800", "Toronto", "{} is in"])
    | st.fixed_dictionaries({"str": st.text(max_size=5)})
)
RECORDS = st.dictionaries(
    st.sampled_from(["prompt", "subject", "target_new", "target_true", "other"]),
    FIELD_VALUES,
    max_size=5,
)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


@FAST
@given(record=RECORDS | JSON_VALUES)
def test_any_request_record_is_accepted_or_refused_with_its_field(record):
    try:
        request = EditRequest.from_dict(record, index=4)
    except RequestError as error:
        assert str(error).startswith("request 4")
        assert "\n" not in str(error)
        return
    assert "{}" in request.prompt and request.subject and request.target_new.strip()
    request.text.encode("utf-8")


@FAST
@given(
    data=st.binary(max_size=200)
    | st.lists(RECORDS, max_size=3).map(lambda rs: json.dumps(rs).encode())
    | st.lists(RECORDS, max_size=3).map(lambda rs: "\n".join(json.dumps(r) for r in rs).encode())
)
def test_any_request_file_loads_or_is_refused_in_one_line(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("requests") / "requests.jsonl"
    path.write_bytes(data)
    try:
        requests = load_requests(path)
    except RequestError as error:
        assert "\n" not in str(error)
        return
    assert requests and all(isinstance(r, EditRequest) for r in requests)


def test_duplicate_and_contradictory_requests_in_one_batch():
    a = EditRequest.create("{} is located in", "Toronto", "France")
    b = EditRequest.create("{} is located in", "Toronto", "Italy")
    with pytest.raises(RequestError, match="request 1, field 'prompt': contradicts request 0"):
        validate_batch([a, b])
    with pytest.raises(RequestError, match="duplicates request 0"):
        validate_batch([a, a])


@FAST
@given(
    records=st.lists(
        st.fixed_dictionaries(
            {"case_id": st.integers(0, 3), "requested_rewrite": RECORDS | JSON_VALUES},
            optional={"paraphrase_prompts": JSON_VALUES, "neighborhood_prompts": JSON_VALUES},
        )
        | JSON_VALUES,
        min_size=0,
        max_size=3,
    ),
    skip=st.booleans(),
)
def test_any_data_set_loads_or_is_refused_naming_the_record(tmp_path_factory, records, skip):
    path = tmp_path_factory.mktemp("data") / "cases.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    try:
        cases = load_cases(path, skip_invalid=skip)
    except DatasetError as error:
        assert "\n" not in str(error)
        return
    assert len(cases) + len(cases.problems) == len(records)


BAD_OPTIONS = st.one_of(
    st.tuples(st.just("--method"), st.sampled_from(["bogus", "memit+x", "", "rome+sphere+sphere"])),
    st.tuples(st.just("--batch-size"), st.integers(-5, 0).map(str)),
    st.tuples(st.just("--eta"), st.sampled_from(["0", "-0.5", "1.01", "nan", "inf", "x"])),
    st.tuples(st.just("--alpha"), st.sampled_from(["-0.01", "1.5", "nan", "abc"])),
    st.tuples(st.just("--layers"), st.sampled_from(["4", "0-9", "-1", "a,b", "1,,2"])),
    st.tuples(
        st.just("--requests"),
        st.sampled_from(["missing.json", "empty", "bad", "latin1", "no-target"]),
    ),
)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(option=BAD_OPTIONS)
def test_cli_edit_refuses_bad_options_without_traceback(env, option):
    files = env.root / "bad-inputs"
    files.mkdir(exist_ok=True)
    (files / "empty").write_bytes(b"")
    (files / "bad").write_bytes(b'[{"prompt": "{} is", "subject": 3}')
    (files / "latin1").write_bytes('[{"prompt": "{} é"}]'.encode("latin-1"))
    no_target = {"prompt": "{} is in", "subject": "Toronto", "target_new": "<|endoftext|>"}
    (files / "no-target").write_text(json.dumps([REQUESTS[0], no_target]))
    out = env.root / "never-written"
    args = _edit_args(env, out)
    name, value = option
    if name == "--requests":
        value = str(files / value)
    if name in args:
        args[args.index(name) + 1] = value
    else:
        args += [name, value]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0, (option, result.output)
    assert "Traceback" not in result.output
    assert not out.exists()


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    option=st.sampled_from(
        [
            ["--n-edits", "0"],
            ["--batch-size", "0"],
            ["--methods", "memit,bogus"],
            ["--methods", ","],
            ["--checkpoint-every", "2"],
            ["--offset", "-1"],
            ["--layers", "9"],
            ["--dataset", "no-such-file.json"],
        ]
    )
)
def test_cli_bench_refuses_bad_options_and_leaves_the_run_directory(env, option):
    out = env.root / "bench-never-written"
    dataset = str(FIXTURES / "counterfact_rome.json")
    args = ["bench", "--out", str(out), "--model", str(env.model), "--n-edits", "3"]
    args += ["--batch-size", "3", "--corpus", str(env.corpus), "--dataset", dataset, *option]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0, (option, result.output)
    assert "Traceback" not in result.output
    assert not out.exists()
