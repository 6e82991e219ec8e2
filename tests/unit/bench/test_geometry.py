"""Weight geometry: the numbers against naive computations, the neuron sample, the PNG
files and HTML, and a whole tiny-model run directory (also through the CLI); the run
replay that the geometry and the general-ability command share."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sphere_edit.bench.geometry import (
    angle_histogram,
    compare_weights,
    cosine_matrix,
    geometry_for_run,
    geometry_html,
    layer_geometry,
    pairwise_angles,
    relative_change,
    sample_neurons,
)
from sphere_edit.cli.app import app
from sphere_edit.editing.journal import JournalError, read_index
from sphere_edit.editing.requests import EditRequest
from sphere_edit.editing.runs import apply_run, is_run_dir, load_run_model
from sphere_edit.model.loading import LoadedModel, load_model
from sphere_edit.sphere.energy import hyperspherical_energy
from tests import FIXTURES_DIR
from tests.tiny_models import make_tiny_model
from tests.unit._helpers import saved_memit_session

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = [1, 2]


@pytest.fixture
def figures():
    """The figures need matplotlib and (for t-SNE) scikit-learn, both optional."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")


def _weights(seed: int, shape=(12, 7)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator)


def _naive_unit(weight: torch.Tensor) -> list[list[float]]:
    rows = weight.double().tolist()
    return [[x / math.sqrt(sum(v * v for v in row)) for x in row] for row in rows]


# -- numbers ---------------------------------------------------------------------------------


def test_cosine_matrix_and_angles_match_naive_loops():
    weight = _weights(0)
    unit = torch.tensor(_naive_unit(weight), dtype=torch.float64)
    cos = cosine_matrix(unit)
    angles = pairwise_angles(unit)
    rows = weight.double().tolist()
    expected_angles = []
    for i, a in enumerate(rows):
        for j, b in enumerate(rows):
            dot = sum(x * y for x, y in zip(a, b, strict=True))
            c = dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
            assert float(cos[i, j]) == pytest.approx(c, abs=1e-12)
            if j > i:
                expected_angles.append(math.degrees(math.acos(max(-1.0, min(1.0, c)))))
    assert angles.tolist() == pytest.approx(expected_angles, abs=1e-9)
    assert len(expected_angles) == 12 * 11 // 2


def test_angles_of_known_directions():
    unit = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    unit = unit / unit.norm(dim=1, keepdim=True)
    assert pairwise_angles(unit).tolist() == pytest.approx([90, 180, 45, 90, 45, 135])
    # Rounding past ±1 does not give NaN.
    assert pairwise_angles(torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)).item() == 0


def test_angle_histogram_counts_like_numpy():
    angles_pre = torch.tensor([0.0, 1.0, 2.0, 45.0, 90.0, 91.5, 179.0, 180.0])
    angles_post = torch.tensor([10.0, 10.5, 100.0])
    histogram = angle_histogram(angles_pre, angles_post, bins=90)
    edges = np.linspace(0, 180, 91)
    assert histogram["edges"] == pytest.approx(edges.tolist())
    assert histogram["pre"] == np.histogram(angles_pre.numpy(), bins=edges)[0].tolist()
    assert histogram["post"] == np.histogram(angles_post.numpy(), bins=edges)[0].tolist()
    # Two-degree bins, [0, 2) holding 0 and 1; 180 itself falls in the last bin.
    assert sum(histogram["pre"]) == 8
    assert histogram["pre"][0] == 2 and histogram["pre"][1] == 1 and histogram["pre"][-1] == 2


def test_sample_is_seeded_private_and_shared_by_pre_and_post():
    state = torch.get_rng_state()
    first = sample_neurons(100, 10, seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is untouched
    assert torch.equal(first, sample_neurons(100, 10, seed=5))
    assert not torch.equal(first, sample_neurons(100, 10, seed=6))
    assert len(set(first.tolist())) == 10 and first.tolist() == sorted(first.tolist())
    assert torch.equal(sample_neurons(8, 10), torch.arange(8))
    with pytest.raises(ValueError, match="at least 2"):
        sample_neurons(8, 1)

    pre = _weights(1, (40, 9))
    post = pre.clone()
    post[3] += 0.5
    summary = compare_weights(pre, post, max_neurons=10, seed=5)
    arrays = summary["_arrays"]
    assert torch.equal(arrays["indices"], sample_neurons(40, 10, 5))
    index = arrays["indices"]
    unit_pre = torch.tensor(_naive_unit(pre), dtype=torch.float64)[index]
    unit_post = torch.tensor(_naive_unit(post), dtype=torch.float64)[index]
    torch.testing.assert_close(arrays["unit_pre"], unit_pre)
    torch.testing.assert_close(arrays["unit_post"], unit_post)
    assert summary["n_sampled"] == 10 and summary["n_neurons"] == 40


def test_he_relative_change_and_neuron_changes():
    pre = _weights(2, (16, 8))
    post = pre.clone()
    post[0] = -post[0]  # a neuron turned around: 180 degrees
    post[1] *= 3.0  # a neuron stretched: no turn
    summary = compare_weights(pre, post, s=1.0)
    he_pre, he_post = hyperspherical_energy(pre), hyperspherical_energy(post)
    assert summary["he_pre"] == pytest.approx(he_pre, rel=1e-12)
    assert summary["he_post"] == pytest.approx(he_post, rel=1e-12)
    assert summary["he_relative_change"] == pytest.approx((he_post - he_pre) / he_pre)
    assert summary["he_change"] == pytest.approx(he_post - he_pre)
    assert summary["neuron_turn_deg"]["max"] == pytest.approx(180.0)
    assert summary["neuron_turn_deg"]["mean"] == pytest.approx(180.0 / 16, abs=1e-5)
    assert summary["neuron_norm_change"]["max_abs"] == pytest.approx(2.0)
    assert summary["delta_fro"] == pytest.approx(float((post - pre).double().norm()))
    # Unchanged weights: nothing moves.
    same = compare_weights(pre, pre.clone())
    assert same["he_relative_change"] == 0 and same["cosine_change_max_abs"] == 0
    assert relative_change(0.0, 1.0) is None and relative_change(math.inf, 1.0) is None
    assert relative_change(2.0, 1.0) == -0.5
    with pytest.raises(ValueError, match="one shape"):
        compare_weights(pre, pre[:3])


# -- figures ---------------------------------------------------------------------------------


def test_layer_geometry_writes_pngs_atomically(tmp_path, figures):
    pre = _weights(3, (30, 10))
    post = pre + 0.1 * _weights(4, (30, 10))
    summary = layer_geometry(pre, post, tmp_path / "fig", name="w", max_neurons=12, seed=1)
    json.dumps(summary, allow_nan=False)
    assert set(summary["figures"]) == {"cosine", "angles", "tsne"}
    for path in summary["figures"].values():
        assert Path(path).read_bytes().startswith(PNG_MAGIC)
    # No temporary files are left behind.
    names = sorted(p.name for p in (tmp_path / "fig").iterdir())
    assert names == ["w_angles.png", "w_cosine.png", "w_tsne.png"]
    assert sum(summary["angle_histogram"]["pre"]) == 12 * 11 // 2
    no_tsne = layer_geometry(pre, post, tmp_path / "b", name="w", tsne=False)
    assert set(no_tsne["figures"]) == {"cosine", "angles"}


def test_html_fragment_embeds_the_figures(tmp_path, figures):
    pre = _weights(5, (10, 6))
    summary = {"layers": {"3": layer_geometry(pre, pre * 1.5, tmp_path, name="l3", tsne=False)}}
    fragment = geometry_html(summary, title="Geometry <test>")
    assert fragment.startswith('<section class="geometry">') and fragment.endswith("</section>")
    assert "Geometry &lt;test&gt;" in fragment
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', fragment)
    assert len(images) == 2
    assert all(base64.b64decode(data).startswith(PNG_MAGIC) for data in images)


# -- a run directory -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tiny_tokenizer, tmp_path_factory):
    """Two MEMIT batches on a tiny GPT-2 (Conv1D: weights stored (in, out)) saved to disk,
    journaled; returns the folder, the run directory and the edited weights."""
    directory = tmp_path_factory.mktemp("geometry")
    folder, loaded, session = saved_memit_session(directory, tiny_tokenizer, "gpt2", LAYERS)
    run_dir = session.run_dir
    session.apply([EditRequest.create("{} is located in", "Toronto", "France")])
    session.apply([EditRequest.create("{} plays the", "Glenn Gould", "guitar")])
    edited = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    return folder, run_dir, edited


def test_apply_run_rebuilds_the_edited_weights(run):
    folder, run_dir, edited = run
    assert is_run_dir(run_dir) and not is_run_dir(folder)
    loaded, index = load_run_model(run_dir)
    assert len(index["batches"]) == 2
    state = loaded.model.state_dict()
    for name, tensor in edited.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_apply_run_refuses_another_base_model(run, tiny_tokenizer):
    _, run_dir, _ = run
    other = LoadedModel(make_tiny_model("gpt2", tiny_tokenizer, seed=9), tiny_tokenizer, "x")
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(JournalError, match="different base model"):
        apply_run(other, run_dir)
    for name, tensor in other.model.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_geometry_for_run(run, tmp_path, figures):
    folder, run_dir, edited = run
    base = load_model(str(folder))
    unedited = {k: v.clone() for k, v in base.model.state_dict().items()}
    out = tmp_path / "geo"
    summary = geometry_for_run(run_dir, out, max_neurons=24, model=base, seed=0)
    # The model passed in comes back unedited.
    for name, tensor in base.model.state_dict().items():
        assert torch.equal(tensor, unedited[name]), name
    json.dumps(summary, allow_nan=False)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["n_batches"] == 2 and set(summary["layers"]) == {"1", "2"}
    index = read_index(run_dir)
    layout = base.layout
    for layer in LAYERS:
        result = summary["layers"][str(layer)]
        assert result["shape"] == list(layout.read_weight(layer).shape)  # (out, in)
        assert result["n_sampled"] == 24 and result["n_neurons"] == 64
        # HE against the base weight and against the journal's HE after the last batch.
        assert result["he_pre"] == pytest.approx(hyperspherical_energy(layout.read_weight(layer)))
        after = index["batches"][-1]["energy"][str(layer)]["after"]
        assert result["he_post"] == pytest.approx(after, rel=1e-9)
        first_before = index["batches"][0]["energy"][str(layer)]["before"]
        assert result["he_relative_change"] == pytest.approx(
            (after - first_before) / first_before, rel=1e-6
        )
        for kind in ("cosine", "angles", "tsne"):
            path = out / f"layer{layer}_{kind}.png"
            assert result["figures"][kind] == str(path)
            assert path.read_bytes().startswith(PNG_MAGIC)
    assert "<img" in geometry_html(summary)


def test_cli_geometry_and_general_on_a_run(run, tmp_path, monkeypatch, figures):
    _, run_dir, _ = run
    monkeypatch.setenv("SPHERE_EDIT_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    out = tmp_path / "figures"
    args = ["geometry", str(run_dir), "--max-neurons", "16", "--out", str(out), "--no-tsne"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "layer1_cosine.png").exists() and (out / "layer2_angles.png").exists()
    assert not (out / "layer1_tsne.png").exists()
    assert json.loads((out / "summary.json").read_text())["layers"]["2"]["n_sampled"] == 16

    fixtures = FIXTURES_DIR / "general"
    result = runner.invoke(
        app, ["general", str(run_dir), "--data", str(fixtures), "--n-items", "2",
              "--tasks", "boolq"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2 batches" in result.output and "boolq_loglik_acc" in result.output

    missing = runner.invoke(app, ["geometry", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "is not a run directory: no such folder" in missing.output
