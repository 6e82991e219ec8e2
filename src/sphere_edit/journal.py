"""The on-disk journal of a sequential edit session.

Layout of a run directory::

    session.json            index: base model, method, layers, options, and one entry per
                            applied batch (file name, SHA-256, HE per layer)
    batches/000001.safetensors   ΔW of every edited weight (storage layout, as added),
                                 the batch's keys per layer ("keys.<layer>") and, for a
                                 method that restrains the sum of its updates (PRUNE),
                                 the raw update per layer ("raw.<layer>", float64)
    batches/000001.json          the batch's requests and diagnostics

Batch files are written first, the index last; every write is atomic, so the index only
ever names complete files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .fileio import sha256_file, write_json, write_tensors

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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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
) -> tuple[str, str, str]:
    stem = batch_stem(index)
    tensors = {f"delta.{name}": t.detach().cpu() for name, t in deltas.items()}
    tensors.update({f"keys.{layer}": k.detach().cpu() for layer, k in keys.items()})
    tensors.update({f"raw.{layer}": r.detach().cpu() for layer, r in (raw or {}).items()})
    write_tensors(run_dir / f"{stem}.safetensors", tensors)
    write_json(run_dir / f"{stem}.json", record)
    return f"{stem}.safetensors", sha256_file(run_dir / f"{stem}.safetensors"), f"{stem}.json"


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


def read_batch(
    run_dir: Path, entry: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """A batch's deltas (by weight name), keys and raw updates (by layer)."""
    path = run_dir / entry["tensors_file"]
    if not path.exists():
        raise JournalError(f"batch {entry['index']}: {path} is missing")
    digest = sha256_file(path)
    if digest != entry["tensors_sha256"]:
        raise JournalError(
            f"batch {entry['index']}: {path} is corrupted (SHA-256 {digest[:12]}…, "
            f"journal says {entry['tensors_sha256'][:12]}…)"
        )
    tensors = load_file(str(path))
    deltas = {k.removeprefix("delta."): v for k, v in tensors.items() if k.startswith("delta.")}
    keys = {int(k.removeprefix("keys.")): v for k, v in tensors.items() if k.startswith("keys.")}
    raw = {int(k.removeprefix("raw.")): v for k, v in tensors.items() if k.startswith("raw.")}
    return deltas, keys, raw
