"""The Journal class: replay of a range of batches, the checks every replay makes, the
header check, and what it reads back (records, edit counts, resumed requests)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sphere_edit.editing.journal import INDEX, Journal, JournalError
from sphere_edit.editing.session import EditSession
from sphere_edit.editing.stats import collect_second_moments, load_corpus
from sphere_edit.editing.vstar import VStarConfig
from sphere_edit.methods import MEMIT
from tests.tiny_models import TRAINING_SENTENCES
from tests.unit._helpers import THREE_BATCHES, assert_weights_equal, tiny_loaded, weights_copy

LAYERS = [1, 2]


@pytest.fixture(scope="module")
def run(tiny_tokenizer, tmp_path_factory):
    """Three MEMIT batches journaled on a tiny llama; the weights after each."""
    directory = tmp_path_factory.mktemp("journal-class")
    loaded = tiny_loaded(tiny_tokenizer)
    corpus_file = directory / "corpus.txt"
    corpus_file.write_text("\n\n".join(TRAINING_SENTENCES), encoding="utf-8")
    moments = collect_second_moments(
        loaded.model, loaded.tokenizer, LAYERS, load_corpus(str(corpus_file)),
        max_tokens=2000, progress=False,
    )  # fmt: skip
    session = EditSession(
        loaded, MEMIT(mom2_weight=1.0), LAYERS, {k: m.moment for k, m in moments.items()},
        target=VStarConfig(steps=3), run_dir=directory / "run", templates=["{}"],
    )  # fmt: skip
    snapshots = [weights_copy(loaded)]
    for batch in THREE_BATCHES:
        session.apply(batch)
        snapshots.append(weights_copy(loaded))
    return SimpleNamespace(session=session, run_dir=directory / "run", snapshots=snapshots)


def _copy(run, tmp_path: Path) -> Journal:
    shutil.copytree(run.run_dir, tmp_path / "copy")
    return Journal(tmp_path / "copy")


def _rewrite_index(journal: Journal, change) -> None:
    index = journal.index()
    change(index)
    (journal.run_dir / INDEX).write_text(json.dumps(index), encoding="utf-8")


def test_replay_in_steps_gives_the_weights_after_each_batch(run, tiny_tokenizer):
    loaded = tiny_loaded(tiny_tokenizer)
    journal = Journal(run.run_dir)
    for start, stop in ((0, 1), (1, 3)):
        replayed = journal.replay(loaded, start=start, stop=stop)
        assert [entry.index for entry, _ in replayed] == list(range(start + 1, stop + 1))
        assert_weights_equal(loaded, run.snapshots[stop])
    assert journal.replay(loaded, start=3) == []
    assert_weights_equal(loaded, run.snapshots[3])
    # The entries it returns chain the edit states as the session recorded them.
    fresh = tiny_loaded(tiny_tokenizer)
    entries = [entry for entry, _ in journal.replay(fresh)]
    assert [e.to_dict() for e in entries] == [e.to_dict() for e in run.session.entries]


def test_a_partial_replay_checks_the_whole_order_and_the_chain_before_it(
    run, tiny_tokenizer, tmp_path
):
    journal = _copy(run, tmp_path)
    loaded = tiny_loaded(tiny_tokenizer)
    journal.replay(loaded, stop=1)
    after_one = weights_copy(loaded)

    def forge_first_state(index):
        index["batches"][0]["state_after"] = "0" * 64

    _rewrite_index(journal, forge_first_state)
    with pytest.raises(JournalError, match="batch 1: the index says the edit state after it"):
        journal.replay(loaded, start=1, stop=2)
    assert_weights_equal(loaded, after_one)

    def drop_last(index):
        index["batches"][2]["index"] = 4

    shutil.rmtree(journal.run_dir)
    journal = _copy(run, tmp_path)
    _rewrite_index(journal, drop_last)
    with pytest.raises(JournalError, match="entry 3 is batch 4; the journal is out of order"):
        journal.replay(loaded, start=1, stop=2)
    assert_weights_equal(loaded, after_one)


def test_a_failed_replay_leaves_the_weights_as_they_were(run, tiny_tokenizer, tmp_path):
    journal = _copy(run, tmp_path)
    path = journal.run_dir / journal.index()["batches"][1]["tensors_file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    loaded = tiny_loaded(tiny_tokenizer)
    with pytest.raises(JournalError, match="batch 2: .* is corrupted"):
        journal.replay(loaded)
    assert_weights_equal(loaded, run.snapshots[0])


def test_verify_names_the_first_field_that_differs(run):
    journal = Journal(run.run_dir)
    header = run.session.header()
    fingerprint = run.session.loaded.fingerprint
    journal.verify(header, fingerprint)
    # The model's name and the templates are not settings: a folder may move.
    journal.verify({**header, "model": "elsewhere", "templates": ["{} x"]}, fingerprint)
    with pytest.raises(JournalError, match=r"layers differs: the journal has \[1, 2\]"):
        journal.verify({**header, "layers": [2], "seed": 5}, fingerprint)
    with pytest.raises(JournalError, match="seed differs"):
        journal.verify({**header, "seed": 5}, fingerprint)
    # The steps' attention implementation is how v* runs, not what it computes.
    for attention in ("model", "eager"):
        journal.verify({**header, "target": {**header["target"], "attention": attention}},
                       fingerprint)  # fmt: skip
    with pytest.raises(JournalError, match="target differs"):
        journal.verify({**header, "target": {**header["target"], "lr": 9.0}}, fingerprint)
    with pytest.raises(JournalError, match="different base model"):
        journal.verify(header, "f" * 64)


def test_records_edit_counts_and_resumed_requests(run, tmp_path):
    journal = Journal(run.run_dir)
    records = journal.records()
    expected = [[r.to_dict() for r in batch] for batch in THREE_BATCHES]
    assert [record["requests"] for record in records] == expected
    sizes = [len(batch) for batch in THREE_BATCHES]
    assert journal.edit_counts() == [sum(sizes[: i + 1]) for i in range(len(sizes))]
    assert journal.mismatched_batch(expected) is None
    assert journal.mismatched_batch(expected[:2]) is None  # a resumed run's first batches
    assert journal.mismatched_batch([expected[0], expected[2]]) == 2

    # A journal whose request records lack the requests (written by an older save()).
    copy = _copy(run, tmp_path)
    second = copy.run_dir / copy.index()["batches"][1]["requests_file"]
    second.write_text(json.dumps({"index": 2}), encoding="utf-8")
    with pytest.raises(JournalError, match="batch 2: .* holds no .requests. list"):
        copy.edit_counts()


def test_weights_snapshot_restores_bitwise(run, tiny_tokenizer):
    from sphere_edit.editing.journal import restore_weights, snapshot_weights

    loaded = tiny_loaded(tiny_tokenizer)
    stored = snapshot_weights(loaded.layout, LAYERS)
    Journal(run.run_dir).replay(loaded)
    assert not torch.equal(loaded.layout.mlp_out(1).weight, stored[1])
    restore_weights(loaded.layout, stored)
    assert_weights_equal(loaded, run.snapshots[0])
