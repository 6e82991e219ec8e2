"""Evaluation sharded over ``torchrun`` ranks.

Rank ``r`` of ``N`` scores cases ``r, r + N, r + 2N, ...`` (interleaved, so that long and
short cases spread evenly), and the per-case results are gathered back into the cases'
order on every rank. Each rank must hold the same model (the benchmark broadcasts rank 0's
edited weights first, :mod:`sphere_edit.bench.ranks`). A case's scores do not depend on
which other cases share its scoring passes except through the padding of a pass, so the
gathered results equal a single process's to rounding. Without ``WORLD_SIZE`` in the
environment this is :func:`.metrics.evaluate_cases`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..editing.stats_dist import ensure_process_group, world
from ..model.placement import input_device
from .data import EditCase
from .metrics import evaluate_cases


def evaluate_sharded(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, cases: Sequence[EditCase], **options: Any
) -> list[dict[str, Any]]:
    """:func:`.metrics.evaluate_cases` of ``cases`` (``options`` are its keywords), this
    rank's share scored here and the others' gathered; every rank returns the whole list,
    in the cases' order."""
    here = world()
    if here.size == 1:
        return evaluate_cases(model, tokenizer, cases, **options)
    ensure_process_group(input_device(model))
    mine = list(cases[here.rank :: here.size])
    scored = evaluate_cases(model, tokenizer, mine, **options) if mine else []
    shards: list[Any] = [None] * here.size
    torch.distributed.all_gather_object(shards, scored)
    results: list[Any] = [None] * len(cases)
    for rank, shard in enumerate(shards):
        results[rank :: here.size] = shard
    return results
