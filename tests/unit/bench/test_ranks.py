"""A benchmark under two gloo ranks: the sharded evaluation gives the single process's
per-case results, and rank 0's run directory holds the single process's numbers."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from sphere_edit.bench.ranks import rank_run_dir, share_edited
from sphere_edit.bench.runner import BenchConfig, Benchmark
from sphere_edit.evaluation.data import load_cases
from sphere_edit.evaluation.metrics import evaluate_cases
from sphere_edit.evaluation.sharded import evaluate_sharded
from sphere_edit.model.loading import LoadedModel
from tests import FIXTURES_DIR
from tests.tiny_models import make_tiny_model, make_tiny_tokenizer

DATASET = FIXTURES_DIR / "counterfact_rome.json"


def _config() -> BenchConfig:
    return BenchConfig(
        model="tiny", methods=("memit",), dataset=str(DATASET), n_edits=3, batch_size=1,
        checkpoint_every=1, stats_tokens=2000,
    )  # fmt: skip


def _loaded() -> LoadedModel:
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model("llama", tokenizer, seed=0)
    return LoadedModel(model=model, tokenizer=tokenizer, name="tiny-llama")


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), SPHERE_EDIT_CACHE=str(Path(out) / "cache"),
    )  # fmt: skip
    torch.set_num_threads(1)
    loaded = _loaded()
    cases = load_cases(DATASET, limit=5).cases
    sharded = evaluate_sharded(loaded.model, loaded.tokenizer, cases, batch_size=4)
    weight = loaded.layout.mlp_out(1).weight
    base = weight.detach().clone()
    with torch.no_grad():
        weight.add_(float(rank + 1))  # the ranks' weights now differ
        shared = share_edited_copy(loaded, weight)
        weight.copy_(base)
    with rank_run_dir(Path(out) / "run", torch.device("cpu"), resume=False) as own:
        summary = Benchmark(_config(), own, log=lambda _: None, progress=False,
                            loaded=loaded).run()  # fmt: skip
    (Path(out) / f"rank{rank}.json").write_text(
        json.dumps({"sharded": sharded, "summary": summary, "dir": str(own), "shared": shared})
    )
    torch.distributed.destroy_process_group()


def share_edited_copy(loaded: LoadedModel, weight: torch.Tensor) -> float:
    """share_edited of layer 1, and the shared weight's sum afterwards."""
    share_edited(loaded, [1])
    return float(weight.double().sum())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _close(a: Any, b: Any, path: str = "") -> None:
    """Equal, floats to 1e-5 relative (shards pad their scoring passes differently)."""
    if isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), f"{path}: {a} != {b}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_two_gloo_ranks_evaluate_and_benchmark_as_one_process(tmp_path, monkeypatch):
    # Forked ranks inherit the imported modules instead of importing torch and transformers.
    args = (2, _free_port(), str(tmp_path))
    mp.start_processes(_rank_main, args=args, nprocs=2, join=True, start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    monkeypatch.setenv("SPHERE_EDIT_CACHE", str(tmp_path / "single-cache"))
    loaded = _loaded()
    cases = load_cases(DATASET, limit=5).cases
    single = json.loads(json.dumps(evaluate_cases(loaded.model, loaded.tokenizer, cases)))
    for rank in ranks:  # every rank holds every case's result, in the cases' order
        _close(rank["sharded"], single, "sharded")
    # share_edited gave rank 1 rank 0's weights (base + 1), not its own (base + 2).
    expected = float((loaded.layout.mlp_out(1).weight.detach().double() + 1).sum())
    assert ranks[0]["shared"] == ranks[1]["shared"]
    assert math.isclose(ranks[1]["shared"], expected, rel_tol=1e-6)
    alone = Benchmark(_config(), tmp_path / "alone", log=lambda _: None, progress=False,
                      loaded=loaded).run()  # fmt: skip

    # Rank 0 wrote the run directory; rank 1 wrote a scratch copy, now removed.
    assert ranks[0]["dir"] == str(tmp_path / "run")
    assert not Path(ranks[1]["dir"]).exists()
    stored = json.loads((tmp_path / "run" / "summary.json").read_text())
    mine, theirs = stored["methods"]["memit"], alone["methods"]["memit"]
    _close(mine["final"]["metrics"], theirs["final"]["metrics"], "final")
    for got, want in zip(mine["checkpoints"], theirs["checkpoints"], strict=True):
        _close(got["metrics"], want["metrics"], f"checkpoint {want['edits']}")
    # Both ranks scored the same (rank 0's) model at every checkpoint.
    _close(ranks[1]["summary"]["methods"]["memit"]["checkpoints"], mine["checkpoints"], "r1")
