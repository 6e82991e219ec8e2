"""Forward-hook helpers and atomic file writes."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from sphere_edit.common.fileio import atomic_path, sha256_file, write_json, write_tensors
from sphere_edit.model.hooks import capture, edit_output, frozen_parameters, run_until_stopped


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_capture_records_input_and_output():
    net = _net()
    x = torch.randn(5, 3)
    with capture(net[2]) as seen:
        out = net(x)
    torch.testing.assert_close(seen.input, torch.relu(net[0](x)))
    torch.testing.assert_close(seen.output, out)
    assert not net[2]._forward_hooks  # removed on exit


def test_capture_with_stop_ends_the_pass():
    net = _net()
    after = []
    net[2].register_forward_hook(lambda *_: after.append(True))
    with capture(net[0], stop=True) as seen:
        run_until_stopped(lambda: net(torch.randn(2, 3)))
    assert seen.output.shape == (2, 4)
    assert after == []
    assert not net[0]._forward_hooks


def test_edit_output_replaces_the_output_and_is_removed():
    net = _net()
    x = torch.randn(2, 3)
    plain = net(x)
    with edit_output(net[0], lambda h: h + 1.0):
        edited = net(x)
    torch.testing.assert_close(edited, net[2](torch.relu(net[0](x) + 1.0)))
    torch.testing.assert_close(net(x), plain)


def test_frozen_parameters_restores_the_flags():
    net = _net()
    net[2].bias.requires_grad_(False)
    with frozen_parameters(net):
        assert not any(p.requires_grad for p in net.parameters())
    flags = [p.requires_grad for p in net.parameters()]
    assert flags == [True, True, True, False]
    with pytest.raises(RuntimeError), frozen_parameters(net):
        raise RuntimeError("boom")
    assert [p.requires_grad for p in net.parameters()] == flags


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "sub" / "data.json"
    write_json(path, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("partial", encoding="utf-8")
        raise RuntimeError("crash while writing")
    assert path.read_text(encoding="utf-8") == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.json"]


def test_write_tensors_and_sha256(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = {"x": torch.arange(6.0).view(2, 3).T, "y": torch.ones(2, dtype=torch.float64)}
    write_tensors(path, tensors, metadata={"k": "v"})
    loaded = load_file(str(path))
    assert torch.equal(loaded["x"], tensors["x"])
    assert torch.equal(loaded["y"], tensors["y"])
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path):
    import os

    from sphere_edit.common.fileio import write_text

    mask = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        plain = tmp_path / "b.txt"
        plain.write_text("x")
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    finally:
        os.umask(mask)


def test_linear_weights_as_casts_for_the_duration_and_puts_the_same_tensors_back():
    from torch import nn

    from sphere_edit.model.hooks import linear_weights_as

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(7, 4)
            self.inner = nn.Linear(4, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    before = {name: p.data_ptr() for name, p in model.named_parameters()}
    copies = {name: p.detach().clone() for name, p in model.named_parameters()}
    with linear_weights_as(model, torch.bfloat16):
        assert model.inner.weight.dtype == torch.bfloat16
        assert model.inner.bias.dtype == torch.bfloat16
        assert torch.equal(model.inner.weight, copies["inner.weight"].to(torch.bfloat16))
        assert model.embed.weight.dtype == torch.float32  # shared with an embedding: left
    for name, p in model.named_parameters():
        assert p.data_ptr() == before[name]  # the original storage, not a copy
        assert torch.equal(p, copies[name])
