"""EditSession and its journal: exact rollback and replay, and refusal of foreign or
damaged journals; the weights SPHERE is given inside a session."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from sphere_edit.editing.journal import INDEX, JournalError, read_index
from sphere_edit.editing.requests import EditRequest
from sphere_edit.editing.session import EditSession, NumericalError
from sphere_edit.editing.stats import collect_second_moments, load_corpus
from sphere_edit.editing.vstar import VStarConfig
from sphere_edit.methods import MEMIT
from sphere_edit.model.arch import ModelLayout
from sphere_edit.model.loading import LoadedModel, weights_fingerprint
from sphere_edit.sphere.energy import hyperspherical_energy
from sphere_edit.sphere.projection import SphereProjection, principal_directions
from tests.tiny_models import TRAINING_SENTENCES, make_tiny_model
from tests.unit._helpers import THREE_BATCHES, assert_weights_equal, tiny_loaded, weights_copy

LAYERS = [1, 2]
TARGET = VStarConfig(steps=3)
BATCHES = THREE_BATCHES


def _moments(loaded: LoadedModel, directory: Path, layers=LAYERS) -> dict[int, torch.Tensor]:
    corpus_file = directory / "corpus.txt"
    corpus_file.write_text("\n\n".join(TRAINING_SENTENCES), encoding="utf-8")
    corpus = load_corpus(str(corpus_file))
    moments = collect_second_moments(
        loaded.model, loaded.tokenizer, layers, corpus, max_tokens=2000, progress=False
    )
    return {layer: m.moment for layer, m in moments.items()}


@pytest.fixture(scope="module")
def run(tiny_tokenizer, tmp_path_factory):
    """Three batches applied to a tiny llama with a journal; snapshots after each."""
    directory = tmp_path_factory.mktemp("journal")
    loaded = tiny_loaded(tiny_tokenizer)
    moments = _moments(loaded, directory)
    method = MEMIT(mom2_weight=1.0)
    run_dir = directory / "run"
    session = EditSession(loaded, method, LAYERS, moments, target=TARGET, run_dir=run_dir, seed=0)
    snapshots = [weights_copy(loaded)]
    results = []
    edited_keys = []
    for batch in BATCHES:
        results.append(session.apply(batch))
        snapshots.append(weights_copy(loaded))
        edited_keys.append({layer: session.states[layer].edited_keys.clone() for layer in LAYERS})
    pristine = directory / "pristine"
    shutil.copytree(run_dir, pristine)
    return SimpleNamespace(
        session=session,
        loaded=loaded,
        moments=moments,
        method=method,
        run_dir=run_dir,
        pristine=pristine,
        snapshots=snapshots,
        results=results,
        edited_keys=edited_keys,
    )


def _copy(run, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(run.pristine, target)
    return target


def test_each_batch_changes_only_the_edited_weights(run):
    layout = run.loaded.layout
    edited = {layout.mlp_out_weight_name(layer) for layer in LAYERS}
    for before, after in zip(run.snapshots, run.snapshots[1:], strict=False):
        for name in before:
            assert torch.equal(before[name], after[name]) == (name not in edited), name
    for i, result in enumerate(run.results, 1):
        assert result.index == i
        assert len(result.target_loss) == len(BATCHES[i - 1])


def test_journal_files(run):
    index = read_index(run.pristine)
    # The fingerprint of the unedited base, not of the model after the first batch.
    base = make_tiny_model("llama", run.loaded.tokenizer, seed=0)
    assert index["base_fingerprint"] == weights_fingerprint(base)
    assert index["layers"] == LAYERS
    assert index["templates"][0] == "{}"
    assert [entry["index"] for entry in index["batches"]] == [1, 2, 3]
    layout = run.loaded.layout
    for i, entry in enumerate(index["batches"]):
        tensors = load_file(str(run.pristine / entry["tensors_file"]))
        for layer in LAYERS:
            name = layout.mlp_out_weight_name(layer)
            delta = tensors[f"delta.{name}"]
            # The delta is what was added to the stored weight (storage layout).
            expected = run.snapshots[i + 1][name] - run.snapshots[i][name]
            torch.testing.assert_close(delta, expected, atol=1e-6, rtol=0)
            assert tensors[f"keys.{layer}"].shape == (len(BATCHES[i]), layout.key_dim(layer))
            energy = entry["energy"][str(layer)]
            weight_after = run.snapshots[i + 1][name]
            assert energy["after"] == pytest.approx(hyperspherical_energy(weight_after))
            assert energy["change"] == pytest.approx(energy["after"] - energy["before"])
            if i > 0:
                previous = index["batches"][i - 1]["energy"][str(layer)]
                assert energy["before"] == previous["after"]
        record = json.loads((run.pristine / entry["requests_file"]).read_text(encoding="utf-8"))
        assert [EditRequest(**r) for r in record["requests"]] == BATCHES[i]


def test_load_onto_fresh_base_restores_the_weights_exactly(run, tiny_tokenizer, tmp_path):
    fresh = tiny_loaded(tiny_tokenizer)
    session = EditSession.load(_copy(run, tmp_path), fresh, run.method, run.moments)
    assert_weights_equal(fresh, run.snapshots[-1])
    assert len(session.batches) == 3
    assert session.templates == run.session.templates
    for layer in LAYERS:
        torch.testing.assert_close(
            session.states[layer].edited_keys, run.edited_keys[-1][layer], rtol=1e-12, atol=0
        )
        assert session.states[layer].n_edits == sum(len(b) for b in BATCHES)
    # Rolling back the replayed session gives the earlier weights, bitwise.
    session.rollback(1)
    assert_weights_equal(fresh, run.snapshots[2])
    assert len(read_index(session.run_dir)["batches"]) == 2


def test_save_then_load_round_trip(run, tiny_tokenizer, tmp_path):
    first = tiny_loaded(tiny_tokenizer)
    session = EditSession.load(_copy(run, tmp_path), first, run.method, run.moments)
    session.save(tmp_path / "saved")
    second = tiny_loaded(tiny_tokenizer)
    EditSession.load(tmp_path / "saved", second, run.method, run.moments)
    assert_weights_equal(second, run.snapshots[-1])


def test_load_onto_a_different_model_is_refused(run, tiny_tokenizer, tmp_path):
    other = tiny_loaded(tiny_tokenizer, seed=1)
    before = weights_copy(other)
    with pytest.raises(JournalError, match="different base model"):
        EditSession.load(_copy(run, tmp_path), other, run.method, run.moments)
    assert_weights_equal(other, before)


def test_corrupted_batch_file_is_refused(run, tiny_tokenizer, tmp_path):
    copy = _copy(run, tmp_path)
    path = copy / read_index(copy)["batches"][1]["tensors_file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(JournalError, match="corrupted"):
        EditSession.load(copy, tiny_loaded(tiny_tokenizer), run.method, run.moments)


def test_failed_load_leaves_the_model_unedited(run, tiny_tokenizer, tmp_path):
    copy = _copy(run, tmp_path)
    path = copy / read_index(copy)["batches"][2]["tensors_file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    fresh = tiny_loaded(tiny_tokenizer)
    before = weights_copy(fresh)
    with pytest.raises(JournalError):
        EditSession.load(copy, fresh, run.method, run.moments)
    assert_weights_equal(fresh, before)


def test_missing_or_damaged_index_and_batch(run, tiny_tokenizer, tmp_path):
    copy = _copy(run, tmp_path)
    fresh = tiny_loaded(tiny_tokenizer)
    (copy / read_index(copy)["batches"][0]["tensors_file"]).unlink()
    with pytest.raises(JournalError, match="missing"):
        EditSession.load(copy, fresh, run.method, run.moments)
    with pytest.raises(JournalError, match="is missing"):
        EditSession.load(tmp_path / "nowhere", fresh, run.method, run.moments)
    (copy / INDEX).write_text("{not json", encoding="utf-8")
    with pytest.raises(JournalError, match="corrupted"):
        read_index(copy)
    (copy / INDEX).write_text(json.dumps({"format": 99}), encoding="utf-8")
    with pytest.raises(JournalError, match="format 99"):
        read_index(copy)


def test_rollback_restores_the_weights_exactly(run):
    """Runs on the fixture's own session; the other tests use copies of its journal."""
    session = run.session
    session.rollback(1)
    assert_weights_equal(run.loaded, run.snapshots[2])
    for layer in LAYERS:
        torch.testing.assert_close(
            session.states[layer].edited_keys, run.edited_keys[1][layer], rtol=1e-12, atol=0
        )
    assert len(read_index(run.run_dir)["batches"]) == 2
    session.rollback(1)
    assert_weights_equal(run.loaded, run.snapshots[1])
    with pytest.raises(ValueError, match="cannot roll back 2"):
        session.rollback(2)
    session.rollback(1)
    assert_weights_equal(run.loaded, run.snapshots[0])
    for layer in LAYERS:
        assert not session.states[layer].edited_keys.any()
        assert session.states[layer].n_edits == 0
    assert read_index(run.run_dir)["batches"] == []


# -- failures leave the model as it was --------------------------------------------------------


class _FailingMethod:
    """MEMIT whose update fails (or returns NaN) at the second layer of a batch."""

    name = "failing"

    def __init__(self, how: str):
        self.how = how
        self.inner = MEMIT(mom2_weight=1.0)
        self.calls = 0

    def update(self, keys, residuals, state):
        self.calls += 1
        delta = self.inner.update(keys, residuals, state)
        if self.calls % len(LAYERS) == 0:
            if self.how == "raise":
                raise RuntimeError("solver exploded")
            delta = delta * float("nan")
        return delta

    def describe(self):
        return {"method": self.name}


@pytest.mark.parametrize(("how", "error"), [("raise", RuntimeError), ("nan", NumericalError)])
def test_failed_batch_leaves_weights_and_journal_unchanged(tiny_tokenizer, tmp_path, how, error):
    loaded = tiny_loaded(tiny_tokenizer)
    moments = {layer: torch.eye(128, dtype=torch.float64) for layer in LAYERS}
    session = EditSession(
        loaded,
        _FailingMethod(how),
        LAYERS,
        moments,
        target=TARGET,
        templates=["{}"],
        run_dir=tmp_path / "run",
    )
    before = weights_copy(loaded)
    with pytest.raises(error):
        session.apply(BATCHES[1])
    assert_weights_equal(loaded, before)
    assert session.batches == []
    assert not (tmp_path / "run" / INDEX).exists()
    for layer in LAYERS:
        assert not session.states[layer].edited_keys.any()


def test_session_rejects_bad_arguments(tiny_tokenizer):
    loaded = tiny_loaded(tiny_tokenizer)
    moments = {layer: torch.eye(128, dtype=torch.float64) for layer in range(4)}
    method = MEMIT()
    with pytest.raises(ValueError, match="increasing"):
        EditSession(loaded, method, [2, 1], moments)
    with pytest.raises(ValueError, match="out of range"):
        EditSession(loaded, method, [4], moments)
    with pytest.raises(ValueError, match="no entry for layer 1"):
        EditSession(loaded, method, [1], {2: moments[2]})
    with pytest.raises(ValueError, match="shape"):
        EditSession(loaded, method, [1], {1: torch.eye(64)})
    with pytest.raises(ValueError, match="at least one"):
        EditSession(loaded, method, [], moments)


# -- SPHERE inside a session -------------------------------------------------------------------


@dataclass(frozen=True)
class _RecordingSphere(SphereProjection):
    calls: list = field(default_factory=list, compare=False, repr=False)

    def __call__(self, delta, *, current, pre_edit):
        out = super().__call__(delta, current=current, pre_edit=pre_edit)
        self.calls.append(
            {
                "delta": delta.clone(),
                "current": current.clone(),
                "pre_edit": pre_edit.clone(),
                "out": out.clone(),
            }  # fmt: skip
        )
        return out


class _RecordingMemit:
    name = "memit"

    def __init__(self):
        self.inner = MEMIT(mom2_weight=0.05)
        self.outputs: list[torch.Tensor] = []

    def update(self, keys, residuals, state):
        delta = self.inner.update(keys, residuals, state)
        self.outputs.append(delta.clone())
        return delta

    def describe(self):
        return self.inner.describe()


def _manual_projection(delta, weight, eta, alpha):
    u = principal_directions(weight, eta)
    return delta - alpha * delta @ u @ u.T


@pytest.mark.parametrize("basis", ["pre_edit", "current"])
def test_session_gives_sphere_the_right_weights(tiny_tokenizer, tmp_path, basis):
    """gpt2 stores the edited weight (in, out): the transform must still get (out, in)."""
    loaded = tiny_loaded(tiny_tokenizer, family="gpt2")
    layout = ModelLayout.of(loaded.model)
    moments = _moments(loaded, tmp_path)
    base = {layer: layout.read_weight(layer).detach().clone() for layer in LAYERS}
    transform = _RecordingSphere(eta=0.5, alpha=0.8, basis=basis)
    method = _RecordingMemit()
    session = EditSession(
        loaded, method, LAYERS, moments, transform=transform, target=TARGET, templates=["{}"]
    )
    session.apply(BATCHES[0])
    after_first = {layer: layout.read_weight(layer).detach().clone() for layer in LAYERS}
    session.apply(BATCHES[1])
    assert len(transform.calls) == 4
    for call_index, call in enumerate(transform.calls):
        batch, layer = divmod(call_index, len(LAYERS))
        layer = LAYERS[layer]
        expected_current = base[layer] if batch == 0 else after_first[layer]
        assert call["current"].shape == (64, 128)
        assert torch.equal(call["current"], expected_current)
        assert torch.equal(call["pre_edit"], base[layer])
        assert torch.equal(call["delta"], method.outputs[call_index])
        weight = expected_current if basis == "current" else base[layer]
        manual = _manual_projection(call["delta"], weight, 0.5, 0.8)
        torch.testing.assert_close(call["out"], manual, atol=1e-12, rtol=0)
        # What the journal holds (and what was added) is the projected update.
        stored = session.batches[batch][0][layout.mlp_out_weight_name(layer)]
        assert torch.equal(stored, layout.to_storage_layout(call["out"]).float().contiguous())
    # In the second batch the two bases differ, and so do the results.
    call = transform.calls[2]
    u_current = principal_directions(call["current"], 0.5)
    u_pre = principal_directions(call["pre_edit"], 0.5)
    assert u_current.shape != u_pre.shape or not torch.allclose(
        u_current @ u_current.T, u_pre @ u_pre.T, atol=1e-6
    )
    other = after_first[LAYERS[0]] if basis == "pre_edit" else base[LAYERS[0]]
    wrong = _manual_projection(call["delta"], other, 0.5, 0.8)
    assert not torch.allclose(call["out"], wrong, atol=1e-9, rtol=0)


def test_an_unjournaled_batch_is_not_applied(run, tiny_tokenizer, tmp_path, monkeypatch):
    """A failed journal write leaves the model, the state and the journal as before."""
    import sphere_edit.editing.journal as journal_module

    copy = _copy(run, tmp_path)
    loaded = tiny_loaded(tiny_tokenizer)
    session = EditSession.load(copy, loaded, run.method, run.moments)
    weights = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    index_before = (copy / "session.json").read_text()
    keys_before = {layer: s.edited_keys.clone() for layer, s in session.states.items()}

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_module, "write_index", full_disk)
    with pytest.raises(OSError, match="No space"):
        session.apply([EditRequest.create("{} is located in", "Rome", "Canada")])
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in weights.items())
    assert (copy / "session.json").read_text() == index_before
    assert len(session.batches) == len(read_index(copy)["batches"])
    for layer, state in session.states.items():
        assert torch.allclose(state.edited_keys, keys_before[layer], atol=1e-9)


@pytest.mark.parametrize(
    ("options", "field_name"),
    [
        ({"method": "alphaedit"}, "method"),
        ({"transform": SphereProjection()}, "transform"),
        ({"target": VStarConfig(steps=4)}, "target"),
    ],
)
def test_load_refuses_other_options_than_the_journal(
    run, tiny_tokenizer, tmp_path, options, field_name
):
    from sphere_edit.methods import AlphaEdit

    fresh = tiny_loaded(tiny_tokenizer)
    before = weights_copy(fresh)
    method = AlphaEdit() if options.pop("method", None) else run.method
    run_dir = _copy(run, tmp_path)
    index_before = (run_dir / INDEX).read_bytes()
    with pytest.raises(JournalError, match=f"{field_name} differs"):
        EditSession.load(run_dir, fresh, method, run.moments, **options)
    assert_weights_equal(fresh, before)
    assert (run_dir / INDEX).read_bytes() == index_before


def test_saved_journal_is_a_complete_journal(run, tiny_tokenizer, tmp_path):
    from sphere_edit.editing.runs import batch_edit_counts

    # A session that replayed a journal saves the same records it read.
    loaded = tiny_loaded(tiny_tokenizer)
    session = EditSession.load(_copy(run, tmp_path), loaded, run.method, run.moments)
    session.save(tmp_path / "saved")
    original, saved = read_index(run.pristine), read_index(tmp_path / "saved")
    for mine, theirs in zip(saved["batches"], original["batches"], strict=True):
        assert mine["energy"] == theirs["energy"]
        for name in ("requests_file", "delta_sha256", "state_before", "state_after"):
            assert mine[name] == theirs[name]
        record = json.loads((tmp_path / "saved" / mine["requests_file"]).read_text())
        assert record == json.loads((run.pristine / theirs["requests_file"]).read_text())
    sizes = [len(batch) for batch in BATCHES]
    counts = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    assert batch_edit_counts(tmp_path / "saved", saved) == counts

    # A session without a run directory saves what a journaled one writes batch by batch.
    fresh = tiny_loaded(tiny_tokenizer)
    unjournaled = EditSession(fresh, run.method, LAYERS, run.moments, target=TARGET, seed=0)
    results = [unjournaled.apply(batch) for batch in BATCHES]
    unjournaled.save(tmp_path / "later")
    later = read_index(tmp_path / "later")
    assert batch_edit_counts(tmp_path / "later", later) == counts
    for entry, theirs, result in zip(later["batches"], original["batches"], results, strict=True):
        assert entry["delta_sha256"] == theirs["delta_sha256"]
        assert entry["energy"] == {
            str(layer): {
                "before": result.energy_before[layer],
                "after": result.energy_after[layer],
                "change": result.energy_change[layer],
            }
            for layer in LAYERS
        }
        record = json.loads((tmp_path / "later" / entry["requests_file"]).read_text())
        expected = json.loads((run.pristine / theirs["requests_file"]).read_text())
        assert sorted(record) == sorted(expected)
        assert record["requests"] == expected["requests"]
        assert record["timings"] == result.timings
        assert record["target_loss"] == result.target_loss
