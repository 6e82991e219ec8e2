"""The benchmark run directory, written down once: its layout, paths, readers and writers.

Layout (every file written atomically, rewritten as the run goes)::

    config.json                 resolved configuration + environment; written first, it
                                is what marks a folder as a benchmark run
    progress.json               what is complete: pre_edit, and each method
    summary.json                all methods, the protocols, correlations, timings
    pre_edit/cases.jsonl        per-case results of the unedited model
    pre_edit/summary.json       their aggregate metrics (and general abilities)
    <method>/batches.jsonl      per batch: HE per layer, timings, v* losses
    <method>/he.csv             edits, layer, energy
    <method>/checkpoints.jsonl  aggregate metrics of the cases edited so far
    <method>/cases.jsonl        per-case results on the final model
    <method>/summary.json       the method's protocols, correlations, timings
    <method>/progress.json      batches recorded so far, timings, general abilities
    <method>/journal/           the method's edit journal: an edit run, whose files
                                (``session.json``, ``batches/``) are
                                :mod:`sphere_edit.editing.journal`'s
    <method>/geometry/          written by ``sphere-edit geometry RUN``: summary.json and
                                the figures of :mod:`sphere_edit.bench.geometry`
    plots/metrics.png           metrics and HE against edits, a line per method
    plots/he_differences.png    consecutive differences (Figure 3 style)
    plots/general.png           general abilities against edits, when measured

``<method>`` is :attr:`MethodSpec.dirname` of each configured method. A finished run
holds every file above but ``geometry/`` (until ``sphere-edit geometry``) and ``plots/``
(skipped without matplotlib; ``general.png`` only when general abilities were measured).

An edit run (``sphere-edit edit``) is the other kind of run directory: a journal alone.
:func:`run_kind` tells the two apart.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from ..common.fileio import write_json, write_text
from ..editing.build import MethodSpec
from ..editing.journal import INDEX

CONFIG = "config.json"
PROGRESS = "progress.json"
SUMMARY = "summary.json"
PRE_EDIT = "pre_edit"
CASES = "cases.jsonl"
BATCHES = "batches.jsonl"
ENERGY = "he.csv"
CHECKPOINTS = "checkpoints.jsonl"
JOURNAL = "journal"
GEOMETRY = "geometry"
GEOMETRY_SUMMARY = "summary.json"
PLOTS = "plots"
METRICS_PLOT = "metrics.png"
DIFFERENCES_PLOT = "he_differences.png"
GENERAL_PLOT = "general.png"
ENERGY_HEADER = "edits,layer,energy"

RunKind = Literal["edit", "bench"]


class RunDirError(ValueError):
    """A folder that is not the kind of run directory a command needs."""


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """One JSON object a line (tensors as lists), written atomically."""
    write_text(path, "".join(json.dumps(row, default=_jsonable) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file; none when it does not exist yet."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


class PreEditDir:
    """``pre_edit/``: the unedited model's results."""

    FILES = (SUMMARY, CASES)

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def cases(self) -> Path:
        return self.path / CASES

    def read_summary(self) -> dict[str, Any]:
        return _read_json(self.summary)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        write_json(self.summary, summary)

    def write_cases(self, rows: Sequence[Mapping[str, Any]]) -> None:
        write_jsonl(self.cases, rows)

    def read_texts(self) -> dict[str, str]:
        """Every file's text by name (what another run copies to reuse these results);
        :class:`FileNotFoundError` naming the first that is missing."""
        return {name: (self.path / name).read_text(encoding="utf-8") for name in self.FILES}

    def write_texts(self, texts: Mapping[str, str]) -> None:
        """The files :meth:`read_texts` gave, into this folder."""
        for name, text in texts.items():
            write_text(self.path / name, text)


class MethodDir:
    """``<method>/``: one method's record, its journal and its geometry."""

    FILES = (BATCHES, ENERGY, CHECKPOINTS, CASES, SUMMARY, PROGRESS)

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def batches(self) -> Path:
        return self.path / BATCHES

    @property
    def energy(self) -> Path:
        return self.path / ENERGY

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def cases(self) -> Path:
        return self.path / CASES

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def progress(self) -> Path:
        return self.path / PROGRESS

    @property
    def journal(self) -> Path:
        """The method's edit run (an edit run directory of its own)."""
        return self.path / JOURNAL

    @property
    def geometry(self) -> Path:
        return self.path / GEOMETRY

    @property
    def geometry_summary(self) -> Path:
        return self.geometry / GEOMETRY_SUMMARY

    def started(self) -> bool:
        """Whether the method has recorded its first batch (its HE series exists)."""
        return self.energy.exists()

    def has_journal(self) -> bool:
        return (self.journal / INDEX).exists()

    def write_batches(self, rows: Sequence[Mapping[str, Any]]) -> None:
        write_jsonl(self.batches, rows)

    def write_checkpoints(self, rows: Sequence[Mapping[str, Any]]) -> None:
        write_jsonl(self.checkpoints, rows)

    def read_checkpoints(self) -> list[dict[str, Any]]:
        return read_jsonl(self.checkpoints)

    def write_energy(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """``he.csv`` from rows of edits, layer, energy (the energy as ``repr`` writes it,
        so that it reads back exactly)."""
        lines = [ENERGY_HEADER] + [f"{r['edits']},{r['layer']},{r['energy']!r}" for r in rows]
        write_text(self.energy, "\n".join(lines) + "\n")

    def read_energy(self) -> list[tuple[int, int, float]]:
        """``he.csv`` as (edits, layer, energy) rows."""
        rows = []
        for line in self.energy.read_text(encoding="utf-8").splitlines()[1:]:
            edits, layer, value = line.split(",")
            rows.append((int(edits), int(layer), float(value)))
        return rows

    def write_cases(self, rows: Sequence[Mapping[str, Any]]) -> None:
        write_jsonl(self.cases, rows)

    def read_summary(self) -> dict[str, Any]:
        return _read_json(self.summary)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        write_json(self.summary, summary)

    def read_progress(self) -> dict[str, Any]:
        """Batches recorded, timings and general abilities so far; empty before the first
        batch."""
        return _read_json(self.progress) if self.progress.exists() else {}

    def write_progress(self, progress: Mapping[str, Any]) -> None:
        write_json(self.progress, progress)

    def read_geometry(self) -> dict[str, Any] | None:
        """The summary ``sphere-edit geometry RUN`` wrote; None before it ran."""
        return _read_json(self.geometry_summary) if self.geometry_summary.exists() else None


class BenchRunDir:
    """A benchmark run directory: a path per file, a :class:`MethodDir` per method."""

    FILES = (CONFIG, PROGRESS, SUMMARY)
    PLOT_FILES = (METRICS_PLOT, DIFFERENCES_PLOT, GENERAL_PLOT)

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def progress(self) -> Path:
        return self.path / PROGRESS

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def pre_edit(self) -> PreEditDir:
        return PreEditDir(self.path / PRE_EDIT)

    @property
    def plots(self) -> Path:
        return self.path / PLOTS

    def method(self, spec: str | MethodSpec) -> MethodDir:
        """The folder of a method, named by its spec (e.g. ``alphaedit+sphere``)."""
        parsed = spec if isinstance(spec, MethodSpec) else MethodSpec.parse(spec)
        return MethodDir(self.path / parsed.dirname)

    def exists(self) -> bool:
        """Whether the run has begun (its ``config.json`` is written)."""
        return self.config.exists()

    def read_config(self) -> dict[str, Any]:
        """``config.json``: ``config`` (the :class:`BenchConfig` fields), ``protocols``,
        ``checkpoints``, ``dataset`` and ``environment``."""
        return _read_json(self.config)

    def write_config(self, config: Mapping[str, Any]) -> None:
        write_json(self.config, config)

    def methods(self) -> list[str]:
        """The configured method specs, in run order."""
        return list(self.read_config()["config"]["methods"])

    def read_summary(self) -> dict[str, Any]:
        if not self.summary.exists():
            raise RunDirError(f"{self.path} has no {SUMMARY} yet; is it a benchmark run directory?")
        return _read_json(self.summary)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        write_json(self.summary, summary)

    def read_progress(self) -> dict[str, Any]:
        """What the run recorded as complete: ``pre_edit`` (bool) and ``methods`` (spec →
        "running" or "complete"); nothing before its pre-edit evaluation."""
        if not self.progress.exists():
            return {"pre_edit": False, "methods": {}}
        return _read_json(self.progress)

    def write_progress(self, progress: Mapping[str, Any]) -> None:
        write_json(self.progress, progress)

    # -- the schema as a whole --------------------------------------------------------------

    def required_files(self, methods: Sequence[str] | None = None) -> list[Path]:
        """Every file a finished run holds (plots and geometry aside)."""
        methods = self.methods() if methods is None else methods
        files = [self.path / name for name in self.FILES]
        files += [self.pre_edit.path / name for name in PreEditDir.FILES]
        for spec in methods:
            folder = self.method(spec)
            files += [folder.path / name for name in MethodDir.FILES]
            files.append(folder.journal / INDEX)
        return files

    def names(self, path: str | Path, methods: Sequence[str] | None = None) -> bool:
        """Whether ``path`` (a file in this run) is one the layout above names: one of
        :meth:`required_files`, a plot, or a file in a method's journal or geometry
        folder (whose contents are their writers')."""
        methods = self.methods() if methods is None else methods
        path = Path(path)
        if path in self.required_files(methods):
            return True
        if path.parent == self.plots and path.name in self.PLOT_FILES:
            return True
        owned = [self.method(s).journal for s in methods] + [
            self.method(s).geometry for s in methods
        ]
        return any(path.is_relative_to(folder) for folder in owned)


def _is_bench_config(path: Path) -> bool:
    # A model folder has a config.json too: a benchmark's holds its BenchConfig.
    try:
        data = _read_json(path)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("config"), dict)


def run_kind(path: str | Path) -> RunKind:
    """ "edit" for an edit run (it holds ``session.json``), "bench" for a benchmark run (it
    holds a benchmark's ``config.json``); :class:`RunDirError` for any other folder."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"{path} is not a run directory: no such folder")
    if (path / INDEX).is_file():
        return "edit"
    if _is_bench_config(path / CONFIG):
        return "bench"
    # A model folder's config.json is no benchmark's: say so rather than "no config.json".
    other = f"; its {CONFIG} is not a benchmark's" if (path / CONFIG).exists() else ""
    raise RunDirError(
        f"{path} is not a run directory: it holds neither {INDEX} (an edit run) nor "
        f"{CONFIG} (a benchmark run){other}"
    )


def find_run_kind(path: str | Path) -> RunKind | None:
    """:func:`run_kind`, or None for anything else (e.g. a model name or folder)."""
    try:
        return run_kind(path)
    except RunDirError:
        return None


def expect_run(path: str | Path, kind: RunKind) -> Path:
    """``path`` when it is a run of ``kind``; else :class:`RunDirError` saying what it is
    and what to give instead."""
    path = Path(path)
    found = run_kind(path)
    if found == kind:
        return path
    if kind == "edit":
        run = BenchRunDir(path)
        methods = run.read_config()["config"].get("methods") or []
        example = run.method(methods[0]).journal if methods else path / "<method>" / JOURNAL
        raise RunDirError(
            f"{path} is a benchmark run, not an edit run; give one method's journal, e.g. {example}"
        )
    raise RunDirError(
        f"{path} is an edit run, not a benchmark run; give a folder written by sphere-edit bench"
    )
