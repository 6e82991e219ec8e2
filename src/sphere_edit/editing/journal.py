"""The on-disk journal of a sequential edit session.

Layout of a run directory::

    session.json            index: base model, method, layers, options, and one entry per
                            applied batch (file name, SHA-256, HE per layer)
    batches/000001.safetensors   ΔW of every edited weight (storage layout, as added),
                                 the batch's keys per layer ("keys.<layer>") and, for a
                                 method that restrains the sum of its updates (PRUNE),
                                 the raw update per layer ("raw.<layer>", float64)
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
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..common.faults import fault_point
from ..common.fileio import sha256_file, write_json, write_tensors

INDEX = "session.json"
FORMAT_VERSION = 1


class JournalError(ValueError):
    pass


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
) -> tuple[str, str, str, str]:
    """Write a batch's files; return the delta file's name and SHA-256, the request file's
    name and the content SHA-256."""
    stem = batch_stem(index)
    tensors = {f"delta.{name}": t.detach().cpu() for name, t in deltas.items()}
    tensors.update({f"keys.{layer}": k.detach().cpu() for layer, k in keys.items()})
    tensors.update({f"raw.{layer}": r.detach().cpu() for layer, r in (raw or {}).items()})
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
