"""LoadedModel's fingerprint and the cache folder (no model files needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sphere_edit.model.loading import LoadedModel, cache_dir, resolve_device, weights_fingerprint
from tests.tiny_models import make_tiny_model


def test_fingerprint_identifies_the_weights(tiny_tokenizer):
    a = make_tiny_model("qwen2", tiny_tokenizer, seed=0)
    b = make_tiny_model("qwen2", tiny_tokenizer, seed=0)
    c = make_tiny_model("qwen2", tiny_tokenizer, seed=1)
    assert weights_fingerprint(a) == weights_fingerprint(b)
    assert weights_fingerprint(a) != weights_fingerprint(c)
    with torch.no_grad():
        b.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-6
    assert weights_fingerprint(a) != weights_fingerprint(b)


def test_fingerprint_is_of_the_weights_as_loaded(tiny_tokenizer):
    """Read for the first time after an edit, it still names the unedited weights."""
    model = make_tiny_model("llama", tiny_tokenizer, seed=0)
    base = weights_fingerprint(model)
    loaded = LoadedModel(model=model, tokenizer=tiny_tokenizer, name="tiny-llama")
    with torch.no_grad():
        loaded.layout.mlp_out(1).weight.add_(1.0)
    assert loaded.fingerprint == base
    assert weights_fingerprint(model) != base


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("SPHERE_EDIT_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("SPHERE_EDIT_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "sphere-edit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "sphere-edit"


def test_fingerprint_ignores_where_the_model_was_loaded_from(tiny_tokenizer):
    """A moved cache or another path to the same weights is the same model (journals and
    statistics stay valid); a changed config value that affects computation is not."""
    model = make_tiny_model("llama", tiny_tokenizer, seed=0)
    base = weights_fingerprint(model)
    model.config._name_or_path = "/somewhere/else"
    model.config.transformers_version = "0.0.0"
    assert weights_fingerprint(model) == base
    model.config.rms_norm_eps = 0.5
    assert weights_fingerprint(model) != base


def test_resolve_device_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--device: 'cuda' asks for a GPU.*--device cpu"):
        resolve_device("cuda")
    for bad in ("tpu", "gpu0", ""):
        with pytest.raises(ValueError, match="cpu, cuda, cuda:N or auto"):
            resolve_device(bad)


def test_resolve_device_with_gpus(monkeypatch):
    """Only the checks: no tensor is put on the (pretended) GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"has 2 GPU\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    with pytest.raises(ValueError, match="not supported"):
        resolve_device("mps")
