"""Fixtures of the command-line tests."""

from __future__ import annotations

import pytest

from tests.tiny_models import make_tiny_model


@pytest.fixture
def tiny_dir(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("SPHERE_EDIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny-llama"
    make_tiny_model("llama", tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(["Paris is the capital of France. Rome is in Italy."] * 40))
    return folder, corpus
