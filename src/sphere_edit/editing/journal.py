"""The on-disk journal of a sequential edit session.

Layout of a run directory::

    session.json            index: base model, method, layers, options, and one entry per
                            applied batch (file name, SHA-256, HE per layer)
    batches/000001.safetensors   ΔW of every edited weight (storage layout, as added),
                                 the batch's keys per layer ("keys.<layer>") and, for a
                                 method that restrains the sum of its updates (PRUNE),
                                 the raw update per layer ("raw.<layer>", float64),
                                 and a method's own state after the batch
                                 ("state.<name>", e.g. UltraEdit's normaliser)
    batches/000001.json          the batch's requests and diagnostics

Batch files are written first, the index last; every write is atomic (temporary file,
fsync, rename), so the index only ever names complete files.

Integrity: each index entry records the delta file's SHA-256 and size, the SHA-256 of its
content (names, dtypes, shapes and bytes of the tensors: the same for bitwise-equal batches
whichever process wrote them, which the file's bytes are not, as safetensors writes its
metadata in hash-map order), and the edit state the batch applies to and leaves:
``state_0`` is the base model's weight fingerprint and
``state_i = sha256(state_{i-1} ":" content SHA-256 of batch i)``. The delta file carries the base
fingerprint and its ``state_before`` in its safetensors metadata, so a batch file from
another journal, a journal for another model, a flipped byte and a truncated file are each
refused with what does not match.

:class:`Journal` is the one way in: a session appends to it, saves through it and replays
from it, and so do the readers of a finished run (``runs``, ``general --edits``, geometry).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..common.faults import fault_point
from ..common.fileio import sha256_file, write_json, write_tensors
from ..common.settings import first_difference

if TYPE_CHECKING:
    from ..methods.base import LayerState
    from ..model.arch import ModelLayout
    from ..model.loading import LoadedModel
    from ..sphere.projection import SphereProjection

INDEX = "session.json"
FORMAT_VERSION = 1
# The modules a journal edits when its index does not say: the MLP output projection.
MLP_OUT: tuple[str, ...] = ("mlp_out",)


class JournalError(ValueError):
    """A journal that cannot be read, is damaged, or belongs to another model or run."""


@dataclass
class BatchEntry:
    index: int
    tensors_file: str
    tensors_sha256: str
    requests_file: str
    energy: dict[str, dict[str, float]]
    tensors_bytes: int | None = None
    delta_sha256: str | None = None
    state_before: str | None = None
    state_after: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class AppliedBatch(NamedTuple):
    """One applied batch as the journal holds it: what was added to each stored weight,
    the keys per layer, and for a method that restrains the sum of its updates (PRUNE) the
    raw update per layer (float64, (out, in)); empty otherwise. ``record`` (the batch's
    request file: requests and diagnostics) and ``energy`` (its index entry's HE per layer)
    are what a journal written from memory needs besides the tensors. ``method_state``
    is a method's state after the batch (UltraEdit's normaliser), by name."""

    deltas: dict[str, torch.Tensor]
    keys: dict[int, torch.Tensor]
    raw: dict[int, torch.Tensor]
    record: dict[str, Any] | None = None
    energy: dict[str, dict[str, float]] | None = None
    method_state: dict[str, torch.Tensor] | None = None


def index_modules(index: Mapping[str, Any]) -> tuple[str, ...]:
    """The modules of each layer a journal's batches edit (its index's ``modules``)."""
    return tuple(index.get("modules") or MLP_OUT)


def snapshot_weights(
    layout: ModelLayout, layers: Iterable[int], modules: Sequence[str] = MLP_OUT
) -> dict[Any, torch.Tensor]:
    """Copies of the MLP output weights of ``layers`` (storage layout), keyed by layer:
    all a journal's batches change, so :func:`restore_weights` puts the model back exactly
    as it was. With other ``modules`` (:func:`index_modules`), keyed by (layer, module)."""
    if tuple(modules) == MLP_OUT:
        return {layer: layout.mlp_out(layer).weight.detach().clone() for layer in layers}
    return {
        (layer, name): layout.module(layer, name).weight.detach().clone()
        for layer in layers
        for name in modules
    }


def restore_weights(layout: ModelLayout, stored: Mapping[Any, torch.Tensor]) -> None:
    """Copy :func:`snapshot_weights`' tensors back into the model, bitwise."""
    with torch.no_grad():
        for key, weight in stored.items():
            module = layout.mlp_out(key) if isinstance(key, int) else layout.module(*key)
            module.weight.copy_(weight)


def restrained_weight(
    method: Any, transform: SphereProjection | None, state: LayerState
) -> torch.Tensor:
    """W0 + SPHERE(restrain(Σ ΔW)) of a layer (out, in), float64: the weight a restraining
    method's model is evaluated with, the projection taking its basis from W0."""
    assert state.accumulated is not None
    wanted = method.restrain(state.accumulated, state)
    if transform is not None:
        wanted = transform(wanted, current=state.pre_edit, pre_edit=state.pre_edit)
    return state.pre_edit.double() + wanted


def set_weights(layout: ModelLayout, weights: dict[int, torch.Tensor]) -> None:
    """Write each layer's weight (out, in) into the model, in its dtype and layout."""
    for layer, value in weights.items():
        weight = layout.mlp_out(layer).weight
        with torch.no_grad():
            weight.copy_(layout.to_storage_layout(value).to(weight.device, weight.dtype))


def add_deltas(
    layout: ModelLayout,
    layers: Iterable[int],
    deltas: Mapping[str, torch.Tensor],
    modules: Sequence[str] = MLP_OUT,
) -> None:
    """Add a batch's deltas (by weight name) to the ``modules`` (default: the MLP output
    projections) of ``layers``, as every route that rebuilds an edited model adds them (so
    the results are bitwise equal)."""
    by_name = {
        layout.module_weight_name(layer, module): (layer, module)
        for layer in layers
        for module in modules
    }
    with torch.no_grad():
        for name, delta in deltas.items():
            if name not in by_name:
                raise JournalError(f"the journal edits {name}, which is not an edited layer here")
            weight = layout.module(*by_name[name]).weight
            if weight.shape != delta.shape:
                raise JournalError(
                    f"{name}: journal delta has shape {tuple(delta.shape)}, "
                    f"the model's weight {tuple(weight.shape)}"
                )
            weight.add_(delta.to(weight.device, weight.dtype))


def chain_fingerprint(state_before: str, delta_sha256: str) -> str:
    """The edit state after a batch: the state before it chained with its content checksum."""
    return hashlib.sha256(f"{state_before}:{delta_sha256}".encode()).hexdigest()


def content_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors``, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def batch_stem(index: int) -> str:
    return f"batches/{index:06d}"


def write_batch(
    run_dir: Path,
    index: int,
    deltas: dict[str, torch.Tensor],
    keys: dict[int, torch.Tensor],
    record: dict[str, Any],
    *,
    raw: dict[int, torch.Tensor] | None = None,
    base: str | None = None,
    state_before: str | None = None,
    method_state: dict[str, torch.Tensor] | None = None,
) -> tuple[str, str, str, str]:
    """Write a batch's files; return the delta file's name and SHA-256, the request file's
    name and the content SHA-256."""
    stem = batch_stem(index)
    tensors = {f"delta.{name}": t.detach().cpu() for name, t in deltas.items()}
    tensors.update({f"keys.{layer}": k.detach().cpu() for layer, k in keys.items()})
    tensors.update({f"raw.{layer}": r.detach().cpu() for layer, r in (raw or {}).items()})
    tensors.update({f"state.{k}": t.detach().cpu() for k, t in (method_state or {}).items()})
    metadata = {"batch": str(index)}
    if base is not None:
        metadata["base_fingerprint"] = base
    if state_before is not None:
        metadata["state_before"] = state_before
    write_tensors(run_dir / f"{stem}.safetensors", tensors, metadata=metadata)
    fault_point("journal-tensors")
    write_json(run_dir / f"{stem}.json", record)
    tensors_file = f"{stem}.safetensors"
    digest = sha256_file(run_dir / tensors_file)
    return tensors_file, digest, f"{stem}.json", content_sha256(tensors)


def write_index(run_dir: Path, header: dict[str, Any], batches: list[BatchEntry]) -> None:
    write_json(
        run_dir / INDEX,
        {"format": FORMAT_VERSION, **header, "batches": [b.to_dict() for b in batches]},
    )


def read_index(run_dir: Path) -> dict[str, Any]:
    path = run_dir / INDEX
    if not path.exists():
        raise JournalError(f"{run_dir} is not an edit run: {INDEX} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise JournalError(f"{path} is corrupted: {error}") from None
    if data.get("format") != FORMAT_VERSION:
        raise JournalError(f"{path} has format {data.get('format')}, expected {FORMAT_VERSION}")
    return data


def require_base(run_dir: Path, index: dict[str, Any], fingerprint: str) -> None:
    """Refuse a journal recorded on another base model than the one with ``fingerprint``."""
    if index["base_fingerprint"] != fingerprint:
        raise JournalError(
            f"{run_dir} was recorded on a different base model "
            f"(fingerprint {index['base_fingerprint'][:12]}…, this model {fingerprint[:12]}…)"
        )


def read_batch(
    run_dir: Path,
    entry: dict[str, Any],
    *,
    base: str | None = None,
    state_before: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """A batch's deltas (by weight name), keys and raw updates (by layer), after checking
    its size, checksum and (when given) the base model and edit state it applies to."""
    number = entry["index"]
    path = run_dir / entry["tensors_file"]
    if not path.exists():
        raise JournalError(f"batch {number}: {path} is missing")
    size = path.stat().st_size
    expected_size = entry.get("tensors_bytes")
    if expected_size is not None and size != expected_size:
        kind = "truncated" if size < expected_size else "longer than recorded"
        raise JournalError(
            f"batch {number}: {path} is {kind} ({size} bytes, journal says {expected_size})"
        )
    digest = sha256_file(path)
    if digest != entry["tensors_sha256"]:
        raise JournalError(
            f"batch {number}: {path} is corrupted (SHA-256 {digest[:12]}…, "
            f"journal says {entry['tensors_sha256'][:12]}…)"
        )
    recorded = entry.get("state_before")
    if state_before is not None and recorded is not None and recorded != state_before:
        raise JournalError(
            f"batch {number}: applies to edit state {recorded[:12]}…, but the batches "
            f"before it leave state {state_before[:12]}…"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise JournalError(f"batch {number}: {path} cannot be read ({error})") from None
    content = entry.get("delta_sha256")
    if content is not None and content_sha256(tensors) != content:
        raise JournalError(f"batch {number}: {path} does not hold the tensors the journal names")
    for key, want, what in (
        ("base_fingerprint", base, "base model"),
        ("state_before", state_before, "edit state"),
    ):
        have = metadata.get(key)
        if want is not None and have is not None and have != want:
            raise JournalError(
                f"batch {number}: {path} was written for another {what} "
                f"({have[:12]}…, expected {want[:12]}…)"
            )
    deltas = {k.removeprefix("delta."): v for k, v in tensors.items() if k.startswith("delta.")}
    keys = {int(k.removeprefix("keys.")): v for k, v in tensors.items() if k.startswith("keys.")}
    raw = {int(k.removeprefix("raw.")): v for k, v in tensors.items() if k.startswith("raw.")}
    return deltas, keys, raw


def read_method_state(run_dir: Path, entry: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A batch's method state (``state.<name>`` tensors; empty for most methods), from a
    file :func:`read_batch` has checked."""
    path = run_dir / entry["tensors_file"]
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {
                k.removeprefix("state."): handle.get_tensor(k)
                for k in handle.keys()  # noqa: SIM118 (safe_open is not a mapping)
                if k.startswith("state.")
            }
    except (SafetensorError, OSError, ValueError) as error:
        raise JournalError(f"batch {entry['index']}: {path} cannot be read ({error})") from None


class Journal:
    """The journal in ``run_dir``: every write and every replay of a run's batches goes
    through here, so that each replay checks the same things (order and gaps, sizes and
    checksums, the base model and the chain of edit states)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def exists(self) -> bool:
        """Whether ``run_dir`` holds an index (a journal with at least its header)."""
        return (self.run_dir / INDEX).is_file()

    def index(self) -> dict[str, Any]:
        """The index (``session.json``), checked for its format."""
        return read_index(self.run_dir)

    # -- writing ----------------------------------------------------------------------------

    def _write(self, number: int, batch: AppliedBatch, base: str, state_before: str) -> BatchEntry:
        """A batch's files (tensors, then request record); its index entry."""
        tensors_file, digest, requests_file, content = write_batch(
            self.run_dir, number, batch.deltas, batch.keys, batch.record or {"index": number},
            raw=batch.raw, base=base, state_before=state_before, method_state=batch.method_state,
        )  # fmt: skip
        return BatchEntry(
            number,
            tensors_file,
            digest,
            requests_file,
            batch.energy or {},
            tensors_bytes=(self.run_dir / tensors_file).stat().st_size,
            delta_sha256=content,
            state_before=state_before,
            state_after=chain_fingerprint(state_before, content),
        )

    def append(
        self,
        header: dict[str, Any],
        entries: Sequence[BatchEntry],
        batch: AppliedBatch,
        *,
        base: str,
        state_before: str,
    ) -> list[BatchEntry]:
        """Journal ``batch`` after ``entries``: its files first, the index last, so that a
        crash in between leaves the journal as it was. Return the new list of entries."""
        entry = self._write(len(entries) + 1, batch, base, state_before)
        new = [*entries, entry]
        fault_point("journal-index")
        self.write_index(header, new)
        return new

    def write_all(
        self, header: dict[str, Any], batches: Sequence[AppliedBatch], *, base: str
    ) -> list[BatchEntry]:
        """Write a whole journal of ``batches`` (numbered from 1) onto base model ``base``;
        return its entries."""
        entries: list[BatchEntry] = []
        state = base
        for number, batch in enumerate(batches, 1):
            record = dict(batch.record) if batch.record is not None else None
            if record is not None:
                record["index"] = number
            entries.append(self._write(number, batch._replace(record=record), base, state))
            state = entries[-1].state_after or state
        self.write_index(header, entries)
        return entries

    def write_index(self, header: dict[str, Any], entries: Sequence[BatchEntry]) -> None:
        """Rewrite the index with ``header`` and ``entries`` (e.g. after a rollback)."""
        write_index(self.run_dir, header, list(entries))

    # -- checking ---------------------------------------------------------------------------

    def verify(
        self, header: dict[str, Any], fingerprint: str, index: dict[str, Any] | None = None
    ) -> None:
        """Refuse a journal recorded on another base model than ``fingerprint`` or with other
        settings than ``header`` (a session's header), naming the first field that differs.
        The model's name and the context templates are not compared: a model moves folders,
        and the templates are the journal's to give."""
        from .vstar import VStarConfig

        index = self.index() if index is None else index
        if index.get("base_fingerprint") != fingerprint:
            raise JournalError(
                f"{self.run_dir} was recorded on a different base model (fingerprint "
                f"{str(index.get('base_fingerprint'))[:12]}…, this model {fingerprint[:12]}…)"
            )
        mine = json.loads(json.dumps(header))
        theirs = dict(index)
        if isinstance(theirs.get("target"), dict):
            # Settings added since the journal was written take their defaults.
            try:
                stored = asdict(VStarConfig(**theirs["target"]))
            except (TypeError, ValueError):  # unknown settings: reported below
                pass
            else:
                theirs["target"] = json.loads(json.dumps(stored))
        for side in (theirs, mine):
            # How the steps run, not what they compute (the same math, other rounding, as
            # on a machine with other threads): a journal resumes under any of them.
            if isinstance(side.get("target"), dict):
                side["target"] = {k: v for k, v in side["target"].items() if k != "attention"}
        if theirs.get("stats_tokens") is not None:
            # Journals written before the statistics recipe was recorded used 256-token pieces.
            theirs.setdefault("stats_pieces", "256")
        # template_tokens only chose how the journal's templates were sampled.
        own = ("model", "templates", "template_tokens", "base_fingerprint")
        keys = [k for k in mine if k not in own]
        difference = first_difference(theirs, mine, keys)
        if difference is not None:
            key, stored_value, value = difference
            raise JournalError(
                f"{self.run_dir}: {key} differs: the journal has {stored_value!r}, "
                f"this run asks for {value!r}"
            )

    # -- reading ----------------------------------------------------------------------------

    def replay(
        self,
        loaded: LoadedModel,
        index: dict[str, Any] | None = None,
        *,
        start: int = 0,
        stop: int | None = None,
    ) -> list[tuple[BatchEntry, AppliedBatch]]:
        """Add batches ``start`` to ``stop`` (positions, default all) to ``loaded``'s weights,
        in order; these must be the base model's plus the batches before ``start``. Every
        batch is checked (order, size and checksums, base model, edit state) before it is
        added. Return each replayed batch's index entry and tensors. On any error the
        weights are left as they were."""
        index = self.index() if index is None else index
        require_base(self.run_dir, index, loaded.fingerprint)
        base = index["base_fingerprint"]
        first = len(index["batches"][:start])
        last = first + len(index["batches"][start:stop])
        layers, modules = index["layers"], index_modules(index)
        backup = snapshot_weights(loaded.layout, layers, modules)
        replayed = []
        state = base
        try:
            for number, entry in enumerate(index["batches"], 1):
                if entry["index"] != number:
                    raise JournalError(
                        f"{self.run_dir / INDEX}: entry {number} is batch {entry['index']}; "
                        "the journal is out of order or has a gap"
                    )
                if number > last:
                    continue
                # The batches before ``start`` are on the weights already: their chain of
                # edit states is checked from the index, without reading their files.
                chosen = number > first
                if chosen:
                    deltas, keys, raw = read_batch(
                        self.run_dir, entry, base=base, state_before=state
                    )
                content = entry.get("delta_sha256") or entry["tensors_sha256"]
                after = chain_fingerprint(state, content)
                if entry.get("state_after") not in (None, after):
                    raise JournalError(
                        f"batch {number}: the index says the edit state after it is "
                        f"{entry['state_after'][:12]}…, the chain gives {after[:12]}…"
                    )
                if chosen:
                    add_deltas(loaded.layout, layers, deltas, modules)
                    extra = read_method_state(self.run_dir, entry) if modules != MLP_OUT else None
                    applied = AppliedBatch(deltas, keys, raw, method_state=extra)
                    replayed.append((_entry(entry, state, after), applied))
                state = after
        except BaseException:
            restore_weights(loaded.layout, backup)
            raise
        return replayed

    def record(self, entry: BatchEntry | dict[str, Any]) -> dict[str, Any]:
        """A batch's request file: its requests and diagnostics."""
        if isinstance(entry, BatchEntry):
            number, name = entry.index, entry.requests_file
        else:
            number, name = entry["index"], entry["requests_file"]
        path = self.run_dir / name
        if not path.is_file():
            raise JournalError(
                f"batch {number}: its request file {path} is missing; the journal cannot be "
                "continued without it (restore the file, or start a new run)"
            )
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            what = "empty" if path.stat().st_size == 0 else f"not valid JSON ({error})"
            raise JournalError(
                f"batch {number}: its request file {path} is {what}; the journal cannot be "
                "continued without it (restore the file, or start a new run)"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("requests"), list):
            raise JournalError(
                f"batch {number}: its request file {path} holds no 'requests' list; it is "
                "not a batch record of this journal"
            )
        return record

    def records(self, index: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Every batch's request file, in order."""
        index = self.index() if index is None else index
        return [self.record(entry) for entry in index["batches"]]

    def edit_counts(self, index: dict[str, Any] | None = None) -> list[int]:
        """The cumulative number of requests after each batch: the edit counts at which the
        run's model can be rebuilt."""
        index = self.index() if index is None else index
        counts, total = [], 0
        for entry, record in zip(index["batches"], self.records(index), strict=True):
            if "requests" not in record:
                raise JournalError(
                    f"batch {entry['index']}: {self.run_dir / entry['requests_file']} has no "
                    "requests (written by a version whose save() left them out); "
                    "rebuild the run"
                )
            total += len(record["requests"])
            counts.append(total)
        return counts

    def mismatched_batch(self, expected: Sequence[Sequence[dict[str, Any]]]) -> int | None:
        """The number of the first journaled batch whose requests are not ``expected``'s
        batch at the same position (request dictionaries), or ``None``: what a resumed run
        checks before it goes on with the rest of its batches."""
        index = self.index()
        for entry, wanted in zip(index["batches"], expected, strict=False):
            if self.record(entry).get("requests") != list(wanted):
                return int(entry["index"])
        return None


def _entry(entry: dict[str, Any], state_before: str, state_after: str) -> BatchEntry:
    return BatchEntry(
        entry["index"],
        entry["tensors_file"],
        entry["tensors_sha256"],
        entry["requests_file"],
        entry.get("energy", {}),
        entry.get("tensors_bytes"),
        entry.get("delta_sha256"),
        state_before,
        state_after,
    )
