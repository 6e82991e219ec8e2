"""Shared pytest fixtures: tiny offline models of every supported family, and the data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from tests.tiny_models import TINY_MODEL_TYPES, make_tiny_model, make_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A small deterministic byte-level BPE fast tokenizer (vocab ~400)."""
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def all_tiny_model_types() -> list[str]:
    """The ``config.model_type`` of every tiny model family."""
    return list(TINY_MODEL_TYPES)


@pytest.fixture(params=TINY_MODEL_TYPES)
def tiny_model(
    request: pytest.FixtureRequest, tiny_tokenizer: PreTrainedTokenizerFast
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """A fresh random tiny model (seed 0) of each family, with the shared tokenizer.

    Function-scoped so that tests may edit the weights in place freely.
    """
    return make_tiny_model(request.param, tiny_tokenizer, seed=0), tiny_tokenizer


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder named by ``SPHERE_EDIT_DATA``; skips the test when it is unset or missing."""
    value = os.environ.get("SPHERE_EDIT_DATA")
    if not value:
        pytest.skip("SPHERE_EDIT_DATA is not set")
    path = Path(value)
    if not path.is_dir():
        pytest.skip(f"SPHERE_EDIT_DATA folder {path} does not exist")
    return path
