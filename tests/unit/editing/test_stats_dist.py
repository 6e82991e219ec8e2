"""C0 at scale: two gloo ranks against one process, resumed partial sums against an
uninterrupted pass, and a corpus streamed from a (faked) hub dataset."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import sphere_edit.editing.stats as stats
from sphere_edit.editing import stats_dist
from sphere_edit.editing.stats import (
    Corpus,
    collect_second_moments,
    layer_second_moments,
    load_corpus,
    stats_cache_path,
    weights_dtype,
)
from sphere_edit.model.loading import LoadedModel
from tests.tiny_models import TRAINING_SENTENCES, make_tiny_model, make_tiny_tokenizer

LAYERS = [1, 2]
# Enough tokens for several 4096-token passes, so both ranks get a share.
TOKENS = 11_000
TEXTS = [f"{i}: {s}" for i in range(40) for s in TRAINING_SENTENCES]


def _corpus() -> Corpus:
    return Corpus(texts=TEXTS, fingerprint="dist-corpus-0123456789abcdef", description="test")


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        SPHERE_EDIT_CACHE=str(Path(out) / "cache"),
    )
    torch.set_num_threads(1)
    tokenizer = make_tiny_tokenizer()
    loaded = LoadedModel(model=make_tiny_model("llama", tokenizer), tokenizer=tokenizer, name="t")
    shard_counts: dict[int, int] = {}
    real_reduce = stats_dist._all_reduce

    def recording(moments):
        shard_counts.update({layer: m.count for layer, m in moments.items()})
        real_reduce(moments)

    stats_dist._all_reduce = recording
    moments = layer_second_moments(loaded, LAYERS, _corpus(), max_tokens=TOKENS, progress=False)
    tensors = {f"total.{layer}": m.total for layer, m in moments.items()}
    tensors.update(
        {
            f"count.{layer}": torch.tensor([moments[layer].count, shard_counts[layer]])
            for layer in LAYERS
        }
    )
    torch.save(tensors, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_two_gloo_ranks_give_the_single_process_c0(tmp_path, monkeypatch):
    # Forked ranks inherit the imported modules instead of importing torch and transformers.
    args = (2, _free_port(), str(tmp_path))
    mp.start_processes(_rank_main, args=args, nprocs=2, join=True, start_method="fork")
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model("llama", tokenizer)
    single = collect_second_moments(
        model, tokenizer, LAYERS, _corpus(), max_tokens=TOKENS, progress=False
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for layer in LAYERS:
        expected = single[layer]
        shards = [int(rank[f"count.{layer}"][1]) for rank in ranks]
        assert all(count > 0 for count in shards), "a rank got no share of the corpus"
        # The shards partition the single-process keys: no token lost or counted twice.
        assert sum(shards) == expected.count
        for rank in ranks:
            assert int(rank[f"count.{layer}"][0]) == expected.count
            assert _relative(rank[f"total.{layer}"], expected.total) <= 1e-12
    # Only rank 0 wrote the cache, and it holds the all-reduced sums.
    monkeypatch.setenv("SPHERE_EDIT_CACHE", str(tmp_path / "cache"))
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name="t")
    for layer in LAYERS:
        path = stats_cache_path(
            loaded.fingerprint, _corpus().fingerprint, layer, TOKENS, weights_dtype(loaded)
        )
        assert torch.equal(load_file(path)["total"], ranks[0][f"total.{layer}"])
    assert not list((path.parent).glob(".partial-*"))


# -- resumable partial sums --------------------------------------------------------------------


class _Interrupt(RuntimeError):
    pass


def _checkpoint(tmp_path: Path, every: int = 1) -> stats_dist.Checkpoint:
    recipe = {"model": "m", "corpus": "c", "tokens": str(TOKENS), "dtype": "float32"}
    return stats_dist.Checkpoint(tmp_path / ".partial.safetensors", recipe, every)


def _collect(model, tokenizer, checkpoint=None):
    return collect_second_moments(
        model,
        tokenizer,
        LAYERS,
        _corpus(),
        max_tokens=3000,
        tokens_per_pass=256,
        progress=False,
        checkpoint=checkpoint,
    )


def test_a_resumed_pass_equals_an_uninterrupted_one_bitwise(tmp_path, monkeypatch):
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model("llama", tokenizer)
    uninterrupted = _collect(model, tokenizer)
    real_add = stats.add_gram
    calls = {"n": 0}

    def failing(total, keys, block=256):
        calls["n"] += 1
        if calls["n"] > 2 * len(LAYERS) + 1:  # a few passes in, mid-pass
            raise _Interrupt
        real_add(total, keys, block)

    checkpoint = _checkpoint(tmp_path)
    monkeypatch.setattr(stats, "add_gram", failing)
    with pytest.raises(_Interrupt):
        _collect(model, tokenizer, checkpoint)
    assert checkpoint.path.exists()
    calls["n"] = -(10**9)  # no more failures; count the passes of the resumed run
    resumed = _collect(model, tokenizer, checkpoint)
    total_passes = sum(1 for _ in stats.packed_batches(_pieces(tokenizer), 256, 0))
    assert calls["n"] + 10**9 == len(LAYERS) * (total_passes - 2), "it did not resume"
    for layer in LAYERS:
        assert resumed[layer].count == uninterrupted[layer].count
        assert torch.equal(resumed[layer].total, uninterrupted[layer].total)
    assert not checkpoint.path.exists()


def _pieces(tokenizer) -> list[list[int]]:
    return sorted(stats._token_pieces(tokenizer, TEXTS, 3000, 256), key=len)


def test_a_partial_of_another_recipe_or_corrupted_is_not_resumed(tmp_path, monkeypatch):
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model("llama", tokenizer)
    uninterrupted = _collect(model, tokenizer)
    checkpoint = _checkpoint(tmp_path)
    moments = {layer: stats.SecondMoment(m.total * 2.0, m.count + 5)
               for layer, m in uninterrupted.items()}  # fmt: skip
    other = {**checkpoint.recipe, "plan": "256:256:1"}
    stats_dist._save_partial(checkpoint.path, other, moments, next_batch=10**6, pieces_done=1)
    again = _collect(model, tokenizer, checkpoint)
    for layer in LAYERS:
        assert torch.equal(again[layer].total, uninterrupted[layer].total)
    # The right recipe but a sum that no longer matches its checksum.
    plan = f"256:256:{len(_pieces(tokenizer))}"
    stats_dist._save_partial(
        checkpoint.path, {**checkpoint.recipe, "plan": plan}, moments, 10**6, 1
    )
    data = load_file(checkpoint.path)
    data["total.1"][0, 0] += 1.0
    from safetensors import safe_open

    with safe_open(str(checkpoint.path), framework="pt") as handle:
        meta = handle.metadata()
    from safetensors.torch import save_file

    save_file(data, str(checkpoint.path), metadata=meta)
    again = _collect(model, tokenizer, checkpoint)
    for layer in LAYERS:
        assert torch.equal(again[layer].total, uninterrupted[layer].total)


def test_layer_second_moments_keeps_its_partial_next_to_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPHERE_EDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(stats_dist.CHECKPOINT_ENV, "1")
    tokenizer = make_tiny_tokenizer()
    loaded = LoadedModel(model=make_tiny_model("llama", tokenizer), tokenizer=tokenizer, name="t")
    real_shard = stats_dist.shard
    seen: list[Path] = []

    def spying(batches, moments, checkpoint=None, plan=""):
        seen.append(checkpoint.path)
        yield from real_shard(batches, moments, checkpoint, plan)

    monkeypatch.setattr(stats_dist, "shard", spying)
    layer_second_moments(loaded, LAYERS, _corpus(), max_tokens=TOKENS, progress=False)
    entry = stats_cache_path(
        loaded.fingerprint, _corpus().fingerprint, 1, TOKENS, weights_dtype(loaded)
    )
    assert seen == [entry.parent / f".partial-layers1-2-{TOKENS}tok-float32-rank0of1.safetensors"]
    assert entry.exists() and not seen[0].exists()


# -- streamed hub datasets ---------------------------------------------------------------------


def test_hf_corpus_is_streamed_and_read_only_as_far_as_needed(monkeypatch, tiny_tokenizer):
    datasets = pytest.importorskip("datasets")
    pulled = {"n": 0}
    calls: list[tuple] = []

    def records():
        for i in range(10**6):
            pulled["n"] += 1
            yield {"text": "" if i % 3 == 0 else f"record {i}: {TRAINING_SENTENCES[i % 5]}"}

    def fake_load_dataset(name, config=None, *, split, streaming):
        calls.append((name, config, split, streaming))
        if name == "wikitext/wikitext-103-raw-v1":
            raise FileNotFoundError("no such dataset")
        return records()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = load_corpus("hf:wikitext/wikitext-103-raw-v1:train")
    assert calls == [
        ("wikitext/wikitext-103-raw-v1", None, "train", True),
        ("wikitext", "wikitext-103-raw-v1", "train", True),
    ]
    pieces = stats._token_pieces(tiny_tokenizer, corpus.texts, 500, 64)
    assert sum(len(p) for p in pieces) == 500
    assert 0 < pulled["n"] < 200
    first = list(corpus.texts)[:3]
    assert first == [f"record {i}: {TRAINING_SENTENCES[i % 5]}" for i in (1, 2, 4)]
    assert load_corpus("hf:wikitext:wikitext-103-raw-v1:test").fingerprint != corpus.fingerprint


def test_hf_corpus_that_cannot_be_streamed_is_one_line(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def failing(*_args, **_kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(stats.CorpusError, match=r"^--corpus hf:nope: cannot stream.*offline"):
        load_corpus("hf:nope")
