"""Where MEMIT's schedule applies the plug-in transforms, and which model PRUNE edits."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest
import torch

from sphere_edit.editing.journal import JournalError
from sphere_edit.editing.runs import load_run_model
from sphere_edit.editing.session import EditSession
from sphere_edit.editing.vstar import VStarConfig, compute_vstar
from sphere_edit.methods import MEMIT, PRUNE, RECT, AlphaEdit
from sphere_edit.methods.base import LayerState
from sphere_edit.methods.rect import keep_largest, relative_change
from sphere_edit.model.loading import LoadedModel
from sphere_edit.sphere.energy import hyperspherical_energy
from sphere_edit.sphere.projection import SphereProjection, principal_directions
from tests.tiny_models import make_tiny_model
from tests.unit._helpers import THREE_BATCHES, mlp_out_module, requests_abc

LAYERS = [1, 2]
TEMPLATES = ["{}", "The sun is a star. {}"]
TARGET = VStarConfig(steps=3)
SPHERE = SphereProjection(eta=0.5, alpha=0.8)


def _loaded(tokenizer) -> LoadedModel:
    model = make_tiny_model("llama", tokenizer, seed=0)
    return LoadedModel(model=model, tokenizer=tokenizer, name="tiny-llama")


def _session(loaded: LoadedModel, method: Any, transform=None, order=None, run_dir=None):
    d_k = mlp_out_module(loaded.model, LAYERS[0]).weight.shape[1]
    moments = {layer: torch.eye(d_k, dtype=torch.float64) for layer in LAYERS}
    return EditSession(
        loaded, method, LAYERS, moments, transform=transform, target=TARGET,
        templates=TEMPLATES, run_dir=run_dir, transform_order=order,
    )  # fmt: skip


def _weights(loaded: LoadedModel) -> dict[int, torch.Tensor]:
    """Each edited layer's weight (out, in) in float64."""
    return {layer: loaded.layout.read_weight(layer).detach().double().clone() for layer in LAYERS}


class _Recording:
    """MEMIT's update, remembering every ΔW it returned (the dense schedule's)."""

    name: ClassVar[str] = "memit"

    def __init__(self, mom2_weight: float) -> None:
        self.inner = MEMIT(mom2_weight=mom2_weight)
        self.deltas: dict[int, torch.Tensor] = {}

    def update(self, keys: torch.Tensor, residuals: torch.Tensor, state: LayerState):
        self.deltas[state.layer] = self.inner.update(keys, residuals, state).clone()
        return self.deltas[state.layer]

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()


def _projected(delta: torch.Tensor, basis_weight: torch.Tensor) -> torch.Tensor:
    """ΔW (I − α U Uᵀ), U from the weight the projection takes its basis from."""
    u = principal_directions(basis_weight, SPHERE.eta)
    return delta - SPHERE.alpha * delta @ u @ u.T


def _restrained(total: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """PRUNE's definition: singular values above σ_max(W0) mapped to ln σ + σ_max − ln σ_max."""
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    sigma_max = float(torch.linalg.svdvals(w0)[0])
    s = torch.where(s > sigma_max, torch.log(s) + sigma_max - torch.log(torch.tensor(sigma_max)), s)
    return (u * s) @ vh


CASES = {
    "memit+sphere": (lambda: MEMIT(mom2_weight=1.0), SPHERE),
    "rect": (lambda: RECT(mom2_weight=1.0), None),
    "rect+sphere": (lambda: RECT(mom2_weight=1.0), SPHERE),
    "prune+sphere": (lambda: PRUNE(mom2_weight=1.0, edit_restrained=True), SPHERE),
}


@pytest.mark.parametrize("name", list(CASES))
def test_after_is_the_dense_schedule_with_each_delta_transformed(tiny_tokenizer, name):
    make, transform = CASES[name]
    requests = requests_abc()
    dense_loaded = _loaded(tiny_tokenizer)
    w0 = _weights(dense_loaded)
    vstar = compute_vstar(
        dense_loaded.model, tiny_tokenizer, dense_loaded.layout, LAYERS[-1], requests,
        TEMPLATES, TARGET,
    )  # fmt: skip
    recording = _Recording(mom2_weight=1.0)
    _session(dense_loaded, recording).apply(requests, precomputed_vstar=vstar)

    after = _loaded(tiny_tokenizer)
    _session(after, make(), transform, order="after").apply(requests, precomputed_vstar=vstar)
    inside = _loaded(tiny_tokenizer)
    _session(inside, make(), transform, order="inside").apply(requests, precomputed_vstar=vstar)

    got, other = _weights(after), _weights(inside)
    for layer in LAYERS:
        delta = recording.deltas[layer]
        if name.startswith("rect"):
            count = round(0.4 * delta.numel())
            delta = keep_largest(delta, relative_change(delta, w0[layer]), 0.4)
            assert int((delta != 0).sum()) == count
        if name.startswith("prune"):
            delta = _restrained(delta, w0[layer])
        if transform is not None:
            delta = _projected(delta, w0[layer])
        torch.testing.assert_close(got[layer], w0[layer] + delta, atol=1e-6, rtol=0)
    # The orders differ where a later layer makes up for what the transform removed.
    assert not torch.allclose(got[LAYERS[-1]], other[LAYERS[-1]], atol=1e-6, rtol=0)


class _OldRECT(RECT):
    """RECT as it was: the mask applied within ``update``, no ``finalize``."""

    finalize = None  # type: ignore[assignment]

    def update(self, keys, residuals, state):
        delta = super().update(keys, residuals, state)
        return keep_largest(delta, relative_change(delta, state.current_weight().double()), 0.4)


@pytest.mark.parametrize("transform", [None, SPHERE])
def test_inside_gives_rect_the_old_edits_bitwise(tiny_tokenizer, tmp_path, transform):
    runs = {}
    for label, method in (("new", RECT(mom2_weight=1.0)), ("old", _OldRECT(mom2_weight=1.0))):
        loaded = _loaded(tiny_tokenizer)
        session = _session(loaded, method, transform, order="inside", run_dir=tmp_path / label)
        for batch in THREE_BATCHES:
            session.apply(batch)
        runs[label] = [e.delta_sha256 for e in session.entries]
    assert runs["new"] == runs["old"]


def test_without_a_transform_the_orders_give_memit_bitwise(tiny_tokenizer, tmp_path):
    runs = {}
    for order in ("inside", "after"):
        session = _session(_loaded(tiny_tokenizer), MEMIT(mom2_weight=1.0), order=order,
                           run_dir=tmp_path / order)  # fmt: skip
        for batch in THREE_BATCHES:
            session.apply(batch)
        runs[order] = [e.delta_sha256 for e in session.entries]
    assert runs["inside"] == runs["after"]


def test_defaults_follow_the_authors_code(tiny_tokenizer):
    loaded = _loaded(tiny_tokenizer)
    assert _session(loaded, MEMIT()).transform_order == "after"
    assert _session(loaded, RECT()).transform_order == "after"
    assert _session(loaded, PRUNE()).transform_order == "after"
    assert _session(loaded, AlphaEdit()).transform_order == "inside"
    with pytest.raises(ValueError, match="transform_order: .*--transform-order"):
        _session(loaded, MEMIT(), order="before")


def test_the_journal_records_the_order_and_resume_refuses_a_change(tiny_tokenizer, tmp_path):
    run_dir = tmp_path / "run"
    session = _session(_loaded(tiny_tokenizer), MEMIT(mom2_weight=1.0), SPHERE, "after", run_dir)
    session.apply(THREE_BATCHES[0])
    index_file = run_dir / "session.json"
    assert json.loads(index_file.read_text())["transform_order"] == "after"
    with pytest.raises(JournalError, match="transform_order"):
        _session(_loaded(tiny_tokenizer), MEMIT(mom2_weight=1.0), SPHERE, "inside",
                 run_dir).resume()  # fmt: skip
    # A journal from before the setting: the transforms were inside the schedule.
    index = json.loads(index_file.read_text())
    del index["transform_order"]
    index_file.write_text(json.dumps(index))
    with pytest.raises(JournalError, match="transform_order"):
        _session(_loaded(tiny_tokenizer), MEMIT(mom2_weight=1.0), SPHERE, "after",
                 run_dir).resume()  # fmt: skip
    resumed = _session(_loaded(tiny_tokenizer), MEMIT(mom2_weight=1.0), SPHERE, "inside", run_dir)
    assert resumed.resume() == 1


# -- PRUNE: which model the next batch edits --------------------------------------------------


def test_prune_edits_the_raw_sum_and_evaluates_the_restrained_one(tiny_tokenizer, tmp_path):
    loaded = _loaded(tiny_tokenizer)
    w0 = _weights(loaded)
    session = _session(loaded, PRUNE(mom2_weight=0.01), SPHERE, run_dir=tmp_path / "run")
    memit_loaded = _loaded(tiny_tokenizer)
    memit = _session(memit_loaded, MEMIT(mom2_weight=0.01))
    for batch in THREE_BATCHES[:2]:
        session.apply(batch)
        memit.apply(batch)
    # The live model is W0 + Σ ΔW_raw: bitwise MEMIT's, so the second batch's v* and keys
    # were computed on it.
    live = _weights(loaded)
    assert all(torch.equal(live[k], v) for k, v in _weights(memit_loaded).items())
    restrained_any = False
    with session.evaluation_weights():
        evaluated = _weights(loaded)
    for layer in LAYERS:
        total = sum(applied.raw[layer] for applied in session.batches)
        wanted = w0[layer] + _projected(_restrained(total, w0[layer]), w0[layer])
        torch.testing.assert_close(evaluated[layer], wanted, atol=1e-6, rtol=0)
        restrained_any |= float(torch.linalg.svdvals(total)[0]) > float(
            torch.linalg.svdvals(w0[layer])[0]
        )
    assert restrained_any  # the edits are large enough for the restraint to act
    # HE is the evaluated model's, not the live one's (MEMIT's).
    energy = session.energy()
    for layer in LAYERS:
        assert energy[layer] == hyperspherical_energy(evaluated[layer])
    assert energy != memit.energy()
    assert all(torch.equal(v, live[k]) for k, v in _weights(loaded).items())
    # Rebuilt from the journal for evaluation: the restrained weights, bitwise.
    rebuilt, _ = load_run_model(tmp_path / "run", model=_loaded(tiny_tokenizer))
    assert all(torch.equal(v, evaluated[k]) for k, v in _weights(rebuilt).items())


def test_prune_resumed_equals_an_uninterrupted_run(tiny_tokenizer, tmp_path):
    def make(run_dir):
        loaded = _loaded(tiny_tokenizer)
        return loaded, _session(loaded, PRUNE(mom2_weight=0.01), SPHERE, run_dir=run_dir)

    whole_loaded, whole = make(tmp_path / "whole")
    for batch in THREE_BATCHES:
        whole.apply(batch)
    _, first = make(tmp_path / "part")
    first.apply(THREE_BATCHES[0])
    part_loaded, resumed = make(tmp_path / "part")
    assert resumed.resume() == 1
    for batch in THREE_BATCHES[1:]:
        resumed.apply(batch)
    assert [e.delta_sha256 for e in resumed.entries] == [e.delta_sha256 for e in whole.entries]
    with whole.evaluation_weights(), resumed.evaluation_weights():
        got, want = _weights(part_loaded), _weights(whole_loaded)
        assert all(torch.equal(got[k], want[k]) for k in LAYERS)
    resumed.rollback(1)
    whole.rollback(1)
    with whole.evaluation_weights(), resumed.evaluation_weights():
        got, want = _weights(part_loaded), _weights(whole_loaded)
        assert all(torch.equal(got[k], want[k]) for k in LAYERS)


def test_prune_header_records_which_model_it_edits(tiny_tokenizer, tmp_path):
    run_dir = tmp_path / "run"
    session = _session(_loaded(tiny_tokenizer), PRUNE(mom2_weight=0.01), run_dir=run_dir)
    session.apply(THREE_BATCHES[0])
    index = json.loads((run_dir / "session.json").read_text())
    assert index["method"]["edit_restrained"] is False
    with pytest.raises(JournalError, match="method"):
        _session(_loaded(tiny_tokenizer), PRUNE(mom2_weight=0.01, edit_restrained=True),
                 run_dir=run_dir).resume()  # fmt: skip
