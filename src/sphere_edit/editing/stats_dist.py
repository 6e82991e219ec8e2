"""Statistics at scale: sharding the C0 pass over ``torchrun`` ranks, resumable partial sums,
and corpora streamed from the Hugging Face hub.

Sharding is by pass: every rank builds the same ordered pieces and the same packed batches
as a single process would (the token budget is applied before sharding, so the union of the
shards is exactly the single-process token set), and rank ``r`` of ``N`` runs batch ``i`` when
``i % N == r``. Each batch's float32 Gram product is therefore the very one a single process
computes; only the float64 additions happen in another order, which keeps the all-reduced
sums within rounding of the single-process ones.

Without ``WORLD_SIZE`` in the environment (set by ``torchrun``) nothing here touches
``torch.distributed``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from ..common.faults import fault_point
from ..common.fileio import file_lock, tensor_sha256, write_tensors

if TYPE_CHECKING:
    from .stats import Corpus, SecondMoment

log = logging.getLogger(__name__)

CHECKPOINT_ENV = "SPHERE_EDIT_STATS_CHECKPOINT"
"""Environment variable: pieces between two partial-sum saves (0 turns saving off)."""
DEFAULT_CHECKPOINT_PIECES = 4096
HF_PREFIX = "hf:"


@dataclass(frozen=True)
class World:
    """This process's place among the ranks: ``size`` 1 when not launched by torchrun."""

    rank: int = 0
    size: int = 1


def world() -> World:
    """The rank and world size ``torchrun`` put in the environment (0 of 1 without it)."""
    if "WORLD_SIZE" not in os.environ:
        return World()
    return World(rank=int(os.environ.get("RANK", "0")), size=int(os.environ["WORLD_SIZE"]))


def rank_device(device: str | None) -> str | None:
    """``device`` for this rank: each ``torchrun`` rank takes its own GPU (``LOCAL_RANK``)."""
    wants_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if wants_gpu and "LOCAL_RANK" in os.environ:
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def ensure_process_group(device: torch.device) -> World:
    """Join the ranks' process group (NCCL for a CUDA model, gloo otherwise) when launched
    by ``torchrun`` and not joined yet; returns this process's :class:`World`."""
    here = world()
    if here.size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return here


@contextmanager
def cache_lock(path: Path, device: torch.device) -> Iterator[None]:
    """The statistics cache's lock. Launched by torchrun, only rank 0 takes the file lock
    (ranks waiting on it would never reach the all-reduce rank 0 waits in); the others
    read the cache once rank 0 holds it, so all ranks see the same entries. The cache
    folder must be one all ranks share (one machine, or a shared file system)."""
    here = ensure_process_group(device)
    if here.size == 1:
        with file_lock(path):
            yield
        return
    if here.rank == 0:
        with file_lock(path):
            torch.distributed.barrier()
            yield
    else:
        torch.distributed.barrier()
        yield


def is_writer() -> bool:
    """Whether this process writes the cache entries (rank 0, or a single process)."""
    return world().rank == 0


@dataclass(frozen=True)
class Checkpoint:
    """Where one statistics job keeps its partial sums, and the recipe they belong to."""

    path: Path
    recipe: dict[str, str]
    every: int


def checkpoint_for(cache_entry: Path, recipe: dict[str, str], layers: Sequence[int]) -> Checkpoint:
    """The partial-sum file of a job filling ``layers``, next to the cache entry of its
    first layer; one file per rank, since each rank sums its own shard."""
    here = world()
    names = "-".join(str(layer) for layer in layers)
    stem = cache_entry.stem.split("-", 1)[1]  # "<tokens>tok-<dtype>"
    name = f".partial-layers{names}-{stem}-rank{here.rank}of{here.size}.safetensors"
    every = int(os.environ.get(CHECKPOINT_ENV, str(DEFAULT_CHECKPOINT_PIECES)))
    full = {**recipe, "layers": names, "rank": str(here.rank), "world": str(here.size)}
    return Checkpoint(path=cache_entry.parent / name, recipe=full, every=every)


def shard(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    moments: dict[int, SecondMoment],
    checkpoint: Checkpoint | None = None,
    plan: str = "",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of ``batches`` (all of them in a single process). The caller adds
    each yielded batch into ``moments`` before asking for the next. With a ``checkpoint``
    the partial sums are saved every ``checkpoint.every`` pieces and a saved partial of the
    same recipe and ``plan`` (how the corpus was cut into batches) is resumed from. Once
    the batches run out, the ranks' sums are all-reduced into ``moments``."""
    here = world()
    if here.size > 1:
        # Called directly rather than through the cache, the group may not be joined yet.
        ensure_process_group(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    recipe = {**checkpoint.recipe, "plan": plan} if checkpoint else {}
    start, pieces_done = _resume(checkpoint, recipe, moments) if checkpoint else (0, 0)
    since_save = 0
    for index, batch in enumerate(batches):
        if index % here.size != here.rank or index < start:
            continue
        yield batch
        pieces_done += batch[0].shape[0]
        since_save += batch[0].shape[0]
        if checkpoint and checkpoint.every > 0 and since_save >= checkpoint.every:
            _save_partial(checkpoint.path, recipe, moments, index + 1, pieces_done)
            since_save = 0
            fault_point("stats-partial")
    if here.size > 1:
        _all_reduce(moments)
    if checkpoint:
        checkpoint.path.unlink(missing_ok=True)


def _all_reduce(moments: dict[int, SecondMoment]) -> None:
    # NCCL reduces only tensors on the GPU; gloo takes them where they are.
    on_gpu = torch.distributed.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    for layer in sorted(moments):
        total = moments[layer].total.to(device)
        count = torch.tensor([moments[layer].count], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
        moments[layer].total.copy_(total.to(moments[layer].total.device))
        moments[layer].count = int(count.item())


def _digest(moments: dict[int, SecondMoment]) -> str:
    parts = [f"{layer}:{moments[layer].count}:{tensor_sha256(moments[layer].total)}"
             for layer in sorted(moments)]  # fmt: skip
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _save_partial(
    path: Path,
    recipe: dict[str, str],
    moments: dict[int, SecondMoment],
    next_batch: int,
    pieces_done: int,
) -> None:
    meta = {
        **recipe,
        "next_batch": str(next_batch),
        "pieces_done": str(pieces_done),
        "counts": json.dumps({str(layer): m.count for layer, m in moments.items()}),
        "sha256": _digest(moments),
    }
    tensors = {f"total.{layer}": m.total for layer, m in moments.items()}
    write_tensors(path, tensors, metadata=meta)


def _resume(
    checkpoint: Checkpoint, recipe: dict[str, str], moments: dict[int, SecondMoment]
) -> tuple[int, int]:
    """Load a matching partial into ``moments``; (first batch to run, pieces done)."""
    path = checkpoint.path
    if not path.exists():
        return 0, 0
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            totals = {layer: handle.get_tensor(f"total.{layer}") for layer in moments}
        counts = {int(k): int(v) for k, v in json.loads(meta["counts"]).items()}
        loaded = {layer: _moment_like(moments[layer], totals[layer], counts[layer])
                  for layer in moments}  # fmt: skip
    except Exception as error:  # noqa: BLE001 - an unreadable partial only costs a restart
        log.warning("partial statistics %s are unreadable (%s); starting over", path, error)
        return 0, 0
    mismatched = [k for k, v in recipe.items() if meta.get(k) != v]
    if mismatched or meta.get("sha256") != _digest(loaded):
        log.warning("partial statistics %s do not match (%s); starting over", path, mismatched)
        return 0, 0
    for layer, moment in loaded.items():
        moments[layer].total.copy_(moment.total)
        moments[layer].count = moment.count
    log.info("resuming the statistics from %s (%s pieces done)", path, meta["pieces_done"])
    return int(meta["next_batch"]), int(meta["pieces_done"])


def _moment_like(template: SecondMoment, total: torch.Tensor, count: int) -> SecondMoment:
    if total.dtype != template.total.dtype or total.shape != template.total.shape:
        raise ValueError(f"partial sum of shape {tuple(total.shape)} and dtype {total.dtype}")
    return type(template)(total=total, count=count)


# -- corpora streamed from the hub -----------------------------------------------------------


class StreamedTexts(list):
    """The non-empty ``text`` fields of a streamed dataset, read only as far as a reader
    iterates (the statistics stop at their token budget); what was read is kept, so a
    second pass sees the same texts without reading the stream again."""

    def __init__(self, records: Iterable[dict[str, object]]) -> None:
        super().__init__()
        self._source: Iterator[dict[str, object]] | None = iter(records)

    def _pull(self) -> bool:
        while self._source is not None:
            record = next(self._source, None)
            if record is None:
                self._source = None
                break
            text = record.get("text")
            if isinstance(text, str) and text.strip():
                self.append(text)
                return True
        return False

    def __iter__(self) -> Iterator[str]:
        index = 0
        while index < super().__len__() or self._pull():
            yield self[index]
            index += 1

    def __len__(self) -> int:
        # A length is the whole stream's: read it to the end.
        while self._pull():
            pass
        return super().__len__()

    def __bool__(self) -> bool:
        return super().__len__() > 0 or self._pull()


def _stream_candidates(spec: str) -> list[tuple[str, str | None, str]]:
    """(name, config, split) readings of ``NAME[:CONFIG[:SPLIT]]``; ``NAME/CONFIG:SPLIT``
    (``wikitext/wikitext-103-raw-v1:train``) is also tried when the second field is a split,
    after ``NAME`` as an ``owner/name`` path, since only the hub can tell the two apart."""
    fields = spec.removeprefix(HF_PREFIX).split(":")
    if len(fields) == 2 and fields[1].split("[")[0] in _SPLITS:
        path, split = fields
        readings: list[tuple[str, str | None, str]] = [(path, None, split)]
        if path.count("/") == 1:
            name, config = path.split("/")
            readings.append((name, config, split))
        return readings
    name, config, split = ([*fields, None, None])[:3]
    return [(name or "", config or None, split or "train")]


_SPLITS = ("train", "validation", "test")


def load_hf_stream(spec: str) -> Corpus:
    """``hf:NAME[:CONFIG[:SPLIT]]`` (or ``hf:NAME/CONFIG:SPLIT``): the dataset streamed from
    the Hugging Face hub (``datasets.load_dataset(..., streaming=True)``), read only as far
    as the statistics need. Its fingerprint is the resolved name, config, split and the
    dataset's version when the hub gives one."""
    from .stats import Corpus, CorpusError

    try:
        import datasets
    except ImportError:
        raise CorpusError(
            f"--corpus {spec}: streaming a hub dataset needs the 'datasets' package "
            "(pip install datasets)"
        ) from None
    first_error: Exception | None = None
    for name, config, split in _stream_candidates(spec):
        if not name:
            raise CorpusError(f"--corpus {spec}: give a dataset name, e.g. hf:wikitext")
        try:
            data = datasets.load_dataset(name, config, split=split, streaming=True)
        except Exception as error:  # noqa: BLE001 - the hub raises many kinds
            first_error = first_error or error
            continue
        version = getattr(getattr(data, "info", None), "version", None)
        tag = f"hf-stream:{name}:{config or ''}:{split}:{version or ''}"
        return Corpus(
            texts=StreamedTexts(data),
            fingerprint=hashlib.sha256(tag.encode()).hexdigest(),
            description=f"hub dataset {name} ({config or 'default'}, {split}), streamed",
        )
    raise CorpusError(f"--corpus {spec}: cannot stream the dataset ({first_error})")
