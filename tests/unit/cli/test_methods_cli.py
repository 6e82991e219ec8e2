"""A method registered from this module alone runs by name, through ``build_session`` and
the command line; bad ``--option`` values are one-line errors naming the option."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from typer.testing import CliRunner

from sphere_edit.cli.app import app
from sphere_edit.editing.build import MethodSpec, build_session
from sphere_edit.methods import LayerState, Option, method_names, register_method
from sphere_edit.methods.registry import unregister_method
from sphere_edit.sphere.projection import SphereProjection
from tests.unit._helpers import requests_abc, tiny_loaded

runner = CliRunner()
# (layer, keys, residuals, ΔW) of every call of the toy method.
CALLS: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []


@dataclass(frozen=True)
class Toy:
    """ΔW = R Kᵀ (K Kᵀ + ridge·I)⁻¹: ridge regression of the residuals on the keys."""

    name: ClassVar[str] = "toy"
    needs_statistics: ClassVar[bool] = False
    ridge: float = 1.0

    def update(
        self, keys: torch.Tensor, residuals: torch.Tensor, state: LayerState
    ) -> torch.Tensor:
        k, r = keys.double().T, residuals.double().T
        system = k @ k.T + self.ridge * torch.eye(k.shape[0], dtype=torch.float64)
        delta = torch.linalg.solve(system, k @ r.T).T
        CALLS.append((state.layer, keys.double(), residuals.double(), delta))
        return delta

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "ridge": self.ridge}


@pytest.fixture
def toy():
    """Register the toy method for one test, and forget it afterwards."""
    register_method(
        help="ridge regression of the residuals on the keys",
        options=(Option("ridge", float, 1.0, "ridge term", low=0, low_open=True),),
    )(Toy)
    CALLS.clear()
    yield Toy
    unregister_method("toy")
    CALLS.clear()
    assert "toy" not in method_names()


GOOD = [
    {"prompt": "{} is located in", "subject": "Toronto", "target_new": "France"},
    {"prompt": "John plays the", "subject": "John", "target_new": "guitar"},
]


def _requests(tmp_path) -> str:
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in GOOD) + "\n")
    return str(path)


def test_toy_method_through_build_session(toy, tiny_tokenizer):
    loaded = tiny_loaded(tiny_tokenizer, "llama")
    session = build_session(
        loaded, "toy", layers=[1, 2], method_overrides={"ridge": 0.5},
        target_overrides={"steps": 2}, progress=False, log=lambda *_: None,
    )  # fmt: skip
    assert isinstance(session.method, Toy) and session.method.ridge == 0.5
    assert session.transform is None
    before = {layer: loaded.layout.read_weight(layer).detach().double().clone() for layer in [1, 2]}
    session.apply(requests_abc()[:2])
    assert sorted(layer for layer, *_ in CALLS) == [1, 2]
    for layer, keys, residuals, delta in CALLS:
        # The definition: ΔW (K Kᵀ + ridge·I) = R Kᵀ, with K, R the columns of the keys.
        k, r = keys.T, residuals.T
        lhs = delta @ (k @ k.T + 0.5 * torch.eye(k.shape[0], dtype=torch.float64))
        torch.testing.assert_close(lhs, r @ k.T, rtol=1e-9, atol=1e-9)
        after = loaded.layout.read_weight(layer).detach().double()
        change = after - before[layer]
        torch.testing.assert_close(change, delta, rtol=0, atol=1e-6)
    sphere = build_session(
        loaded, MethodSpec.parse("toy+sphere"), layers=[1], progress=False, log=lambda *_: None
    )
    assert isinstance(sphere.transform, SphereProjection)
    assert sphere.transform.alpha == 0.8  # the default of a method that declares none


@pytest.mark.parametrize("spec", ["toy", "toy+sphere"])
def test_toy_method_through_the_cli(toy, tiny_dir, tmp_path, spec):
    folder, corpus = tiny_dir
    out = tmp_path / "run"
    args = [
        "edit", "--model", str(folder), "--requests", _requests(tmp_path), "--out", str(out),
        "--method", spec, "--batch-size", "1", "--layers", "1,2", "--steps", "2",
        "--option", "ridge=2",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "preset: generic (no preset for this model" in result.output
    index = json.loads((out / "session.json").read_text())
    assert index["method_spec"] == spec
    assert index["method"] == {"method": "toy", "ridge": 2}
    assert len(index["batches"]) == 2


def test_energy_says_which_preset_it_used(tiny_dir):
    folder, _ = tiny_dir
    result = runner.invoke(app, ["energy", "--model", str(folder)])
    assert result.exit_code == 0, result.output
    assert "preset: generic" in result.output


def test_an_unregistered_method_is_unknown(tiny_dir, tmp_path):
    folder, _ = tiny_dir
    args = [
        "edit", "--model", str(folder), "--requests", _requests(tmp_path),
        "--out", str(tmp_path / "run"), "--method", "toy",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert "unknown method 'toy'" in result.output


@pytest.mark.parametrize(
    ("method", "option", "message"),
    [
        ("alphaedit", "nullspace_threshold=0", "'nullspace_threshold' of alphaedit must be a"),
        ("alphaedit", "l2=-1", "'l2' of alphaedit must be a number >= 0, got -1"),
        ("alphaedit", "l2=abc", "'l2' of alphaedit must be a number >= 0, got 'abc'"),
        ("alphaedit", "bogus=1", "alphaedit has no such option; valid: nullspace_threshold, l2"),
        ("rect", "keep_fraction=1.5", "'keep_fraction' of rect must be a number in (0, 1]"),
        ("ft", "steps=2.5", "'steps' of ft must be an integer >= 1"),
        ("ft", "epsilon=true", "'epsilon' of ft must be a number > 0 or null"),
        ("prune", "log_base=1", "'log_base' of prune must be a number > 1"),
        ("rome", "layer=3", "rome has no such option; valid: none"),
    ],
)  # fmt: skip
def test_bad_options_are_one_line_errors(tiny_dir, tmp_path, monkeypatch, method, option, message):
    folder, corpus = tiny_dir
    # Wide enough that rich does not wrap the message (a terminal's width is not ours).
    monkeypatch.setattr(sys.modules["sphere_edit.cli.app"].err, "width", 10_000)
    args = [
        "edit", "--model", str(folder), "--requests", _requests(tmp_path),
        "--out", str(tmp_path / "run"), "--corpus", str(corpus), "--method", method,
        "--option", option,
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "session.json").exists()
