"""A benchmark launched by ``torchrun``: its evaluations sharded over the ranks.

Every rank runs the whole benchmark (the same batches, so each session stays in step with
rank 0's and reaches each evaluation with it); before each evaluation rank 0's edited
weights are broadcast, so that all ranks score one model, bitwise, even where their own
edits differ by rounding; the cases are then scored in shards
(:func:`sphere_edit.evaluation.sharded.evaluate_sharded`). Only rank 0 writes the run
directory and holds its lock. The other ranks write a scratch copy (of the run being
resumed, for ``--resume``), removed when they finish. Generation (fluency) and the general
abilities are not sharded: each rank computes them, and rank 0's are recorded.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from ..common.fileio import RUN_LOCK
from ..editing.stats_dist import ensure_process_group, world
from ..model.loading import LoadedModel
from .snapshots import editable_modules


@contextmanager
def rank_run_dir(run_dir: Path, device: torch.device, *, resume: bool) -> Iterator[Path]:
    """The folder this rank's benchmark writes: ``run_dir`` on rank 0 (and alone), a scratch
    copy on the others. Rank 0 starts once the others have copied the run."""
    here = world()
    if here.size == 1:
        yield run_dir
        return
    ensure_process_group(device)
    if here.rank == 0:
        torch.distributed.barrier()
        yield run_dir
        return
    scratch = Path(tempfile.mkdtemp(prefix=f"sphere-edit-rank{here.rank}-"))
    try:
        copy = scratch / run_dir.name
        if resume and run_dir.exists():
            shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(RUN_LOCK))
        torch.distributed.barrier()
        yield copy
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def share_edited(loaded: LoadedModel, layers: Sequence[int]) -> None:
    """Rank 0's weights of every module a method may change in ``layers``, on every rank."""
    if world().size == 1:
        return
    with torch.no_grad():
        for layer in layers:
            for module in editable_modules(loaded, layer):
                for param in module.parameters():
                    torch.distributed.broadcast(param.data, src=0)
