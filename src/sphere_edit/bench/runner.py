"""The sequential editing benchmark behind ``sphere-edit bench``.

Every method starts from the same base model and edits the same cases in the same order,
``batch_size`` at a time. Two protocols are measured and named in the output:

- ``final``: after the last batch, every edited case is evaluated on the final model (the
  paper's protocol);
- ``checkpoint``: every ``checkpoint_every`` edits, the cases edited so far are evaluated on
  the model as it is then, which gives the curves.

The pre-edit model is evaluated on the same cases once. Hyperspherical energy of every
edited layer is recorded after every batch; the Spearman rank correlation between the HE
series (mean over edited layers) and each metric series across checkpoints, and the fit of
consecutive differences, are in the summary (the paper's Figures 2 and 3).

The run directory and its files are :mod:`sphere_edit.bench.rundir`'s. Its settings,
:class:`BenchConfig`, are :mod:`sphere_edit.bench.config`'s (re-exported here).

An interrupted run continues with ``resume=True`` (``sphere-edit bench --resume``): see
the resume section below and ``docs/reliability.md``.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..common.faults import fault_point
from ..common.fileio import RUN_LOCK
from ..common.heap import release_free_memory
from ..common.progress import Progress
from ..common.settings import first_difference
from ..editing.build import build_session
from ..editing.presets import load_preset_file
from ..editing.requests import RequestError, repeated_facts, validate_batch
from ..editing.session import EditSession
from ..editing.vstar import VStarResult
from ..evaluation.data import CaseSet, EditCase, load_cases
from ..evaluation.metrics import aggregate, evaluate_generation, merge_results
from ..evaluation.sharded import evaluate_sharded
from ..model.loading import LoadedModel, load_model
from ..model.placement import input_device
from ..sphere.warning import EnergyWarning
from .analysis import case_intervals
from .config import PRE_EDIT_SETTINGS, load_resume_state, order_cases
from .config import BenchConfig as BenchConfig  # re-exported: the runner's settings
from .ranks import share_edited
from .record import HEADLINE_METRICS, MethodRun
from .rundir import SUMMARY, BenchRunDir, MethodDir
from .snapshots import restore_edited, snapshot_edited

# The paper-style table's per-case columns, each stored with its bootstrap interval.
INTERVAL_KEYS = HEADLINE_METRICS + (
    "rewrite_prob_success", "paraphrase_prob_success", "neighborhood_prob_success",
    "fluency", "consistency",
)  # fmt: skip


def environment(loaded: LoadedModel) -> dict[str, Any]:
    import transformers

    return {
        "sphere_edit": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(input_device(loaded.model)),
        # Where each module was put, for a model spread over devices (--device-map).
        **({"device_map": loaded.device_map} if loaded.device_map is not None else {}),
        "model_fingerprint": loaded.fingerprint,
    }


# The first batch's v* by targets key (``EditSession.vstar_key``): (the method that
# computed it, the v*).
FirstTargets = dict[str, tuple[str, VStarResult]]


class Benchmark:
    """Runs a :class:`BenchConfig` into a run directory."""

    def __init__(
        self,
        config: BenchConfig,
        run_dir: str | Path,
        *,
        log: Callable[[str], None] = print,
        progress: bool = True,
        loaded: LoadedModel | None = None,
        resume: bool = False,
        pre_edit_from: str | Path | None = None,
        first_targets: FirstTargets | None = None,
    ):
        self.config = config
        # Another run of the same model, cases and evaluation settings (typically the
        # same benchmark with other methods, run in parallel): its pre-edit results are
        # reused instead of evaluated again.
        self.pre_edit_from = Path(pre_edit_from) if pre_edit_from is not None else None
        self.run_dir = Path(run_dir)
        self.layout = BenchRunDir(self.run_dir)
        self.log = log
        self.progress = progress
        self._loaded = loaded
        self.resume = resume
        self._state: dict[str, Any] = {"pre_edit": False, "methods": {}}
        # Every method edits the same first batch of the same base model: the v* of
        # methods that take precomputed targets is computed once per targets key. A caller
        # running several benchmarks of one config on one model (a sweep) passes one dict
        # to all of them, so that the first batch's v* is shared across them too.
        self._first_targets: FirstTargets = first_targets if first_targets is not None else {}
        self._edited: list[int] = []  # the layers of the method being run

    # -- setup ------------------------------------------------------------------------------

    def _prepare_dir(self) -> None:
        if self.resume and not self.run_dir.exists():
            raise FileNotFoundError(f"--resume: {self.run_dir} does not exist; nothing to resume")
        if self.run_dir.exists() and any(
            p.name != RUN_LOCK and not (self.resume and p.name.startswith("."))
            for p in self.run_dir.iterdir()
        ):
            raise FileExistsError(
                f"output: {self.run_dir} is not empty; choose a new directory "
                "(or remove this one) so that no earlier run is overwritten, "
                "or continue it with --resume"
            )

    def _cases(self) -> CaseSet:
        c = self.config
        case_set = load_cases(
            c.dataset, limit=c.n_edits, offset=c.offset, skip_invalid=c.skip_invalid
        )
        for problem in case_set.problems:
            self.log(f"skipped: {problem}")
        if len(case_set) < c.n_edits:
            raise ValueError(
                f"n_edits: {c.dataset} gives {len(case_set)} valid cases from offset "
                f"{c.offset}, fewer than {c.n_edits}; lower --n-edits"
            )
        return case_set

    def _check_batches(self, cases: Sequence[EditCase]) -> list[list[Any]]:
        """Every batch's requests, checked before the pre-edit evaluation and any edit: a
        batch the session would refuse (a duplicate or contradiction inside it) stops the
        run now, not hours in. Returns the case ids of the repeats edited together."""
        size, pairs = self.config.batch_size, []
        for begin in range(0, len(cases), size):
            batch = cases[begin : begin + size]
            requests = [case.request for case in batch]
            try:
                validate_batch(requests, repeats=self.config.repeats == "edit")
            except RequestError as error:
                raise ValueError(
                    f"dataset: batch {begin // size + 1} (cases {begin}-"
                    f"{min(begin + size, len(cases)) - 1} in edit order): {error} (in a "
                    "benchmark: through the dataset, --n-edits, --offset or --batch-size, "
                    "or edit both with --repeats edit)"
                ) from None
            pairs += [[batch[i].case_id, batch[j].case_id] for i, j in repeated_facts(requests)]
        for first, later in pairs:
            self.log(f"repeats: cases {first} and {later} (one prompt and subject) edited together")
        return pairs

    # -- evaluation -------------------------------------------------------------------------

    def _evaluate(self, loaded: LoadedModel, cases: Sequence[EditCase]) -> list[dict[str, Any]]:
        share_edited(loaded, self._edited)  # under torchrun: every rank scores rank 0's model
        return evaluate_sharded(
            loaded.model, loaded.tokenizer, cases, batch_size=self.config.eval_batch_size,
            progress=self.progress,
        )  # fmt: skip

    def _generation(self, loaded: LoadedModel, cases: Sequence[EditCase]) -> list[dict]:
        chosen = list(cases[: self.config.fluency_cases])
        if not chosen:
            return []
        return evaluate_generation(loaded.model, loaded.tokenizer, chosen, seed=self.config.seed)

    def _general(self, loaded: LoadedModel) -> dict[str, Any]:
        from ..evaluation.general import evaluate_general

        c = self.config
        tasks = {} if c.general_tasks is None else {"tasks": c.general_tasks}
        return evaluate_general(
            loaded.model, loaded.tokenizer, c.general_data, n_items=c.general_items, **tasks
        )

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        c = self.config
        resuming = self.resume and self.layout.exists()
        if resuming:
            self._state = load_resume_state(c, self.run_dir)
        else:
            self._prepare_dir()
        started = time.perf_counter()
        clock = time.perf_counter()
        loaded = self._loaded or load_model(c.model)
        load_seconds = time.perf_counter() - clock
        case_set = self._cases()
        cases = order_cases(list(case_set), c.case_order)
        repeats = self._check_batches(cases)
        # Checked before the folder is created: a refused source leaves nothing behind.
        borrowed = self._pre_edit_source(loaded) if self.pre_edit_from is not None else None
        if not resuming:
            # Created only now: a run refused for its options or data leaves no folder.
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._write_config(case_set, loaded)
        pre = self._stored_pre_edit() if resuming else None
        if pre is None and borrowed is not None:
            self.layout.pre_edit.write_texts(borrowed)
            self.log(f"pre-edit: results of {self.pre_edit_from} reused")
            pre = json.loads(borrowed[SUMMARY])
        if pre is None:
            pre = self._pre_edit(loaded, cases)
        self._mark(pre_edit=True)
        summary: dict[str, Any] = {
            "dataset": case_set.dataset,
            "model": loaded.name,
            "n_edits": c.n_edits,
            "batch_size": c.batch_size,
            "repeats": {"policy": c.repeats, "case_pairs": repeats},
            "pre_edit": pre,
            "methods": {},
            # Only a load this run did is timed (the CLI hands in a loaded model).
            **({"load_model_seconds": load_seconds} if self._loaded is None else {}),
        }
        self.layout.write_summary(summary)

        base = snapshot_edited(loaded)
        for spec in c.methods:
            stored = self._stored_method(spec) if resuming else None
            if stored is not None:
                self.log(f"{spec}: complete in {self.run_dir}; skipped")
                summary["methods"][spec] = stored
                continue
            self._mark(method=(spec, "running"))
            try:
                summary["methods"][spec] = self._run_method(loaded, spec, cases)
            finally:
                restore_edited(loaded, base)
            self._mark(method=(spec, "complete"))
            summary["wall_seconds"] = time.perf_counter() - started
            self.layout.write_summary(summary)
        summary["wall_seconds"] = time.perf_counter() - started
        summary["peak_rss_mib"] = peak_rss_mib()
        self.layout.write_summary(summary)
        self._plots()
        return summary

    def _write_config(self, case_set: CaseSet, loaded: LoadedModel) -> None:
        c = self.config
        self.layout.write_config(
            {
                "config": asdict(c),
                "protocols": {
                    "final": "every edited case evaluated on the final model",
                    "checkpoint": "cases edited so far evaluated every checkpoint_every edits",
                },
                "checkpoints": c.checkpoints(),
                "dataset": {
                    "kind": case_set.dataset,
                    "format": case_set.format,
                    "path": str(case_set.path),
                    "skipped": [p.to_dict() for p in case_set.problems],
                },
                "environment": environment(loaded),
            },
        )

    def _pre_edit(self, loaded: LoadedModel, cases: list[EditCase]) -> dict[str, Any]:
        out = self.layout.pre_edit
        clock = time.perf_counter()
        results = self._evaluate(loaded, cases)
        generation = self._generation(loaded, cases)
        per_case = merge_results(results, generation) if generation else results
        out.write_cases(per_case)
        pre = {"metrics": aggregate(per_case), "seconds": time.perf_counter() - clock}
        if self.config.general_every:
            clock = time.perf_counter()
            pre["general"] = self._general(loaded)
            pre["general_seconds"] = time.perf_counter() - clock
        out.write_summary(pre)
        self.log(f"pre-edit: {_headline(pre['metrics'])}")
        return pre

    def _pre_edit_source(self, loaded: LoadedModel) -> dict[str, str]:
        """The pre-edit files of ``pre_edit_from`` (name → text), after checking that they
        are the ones this run would compute: same model weights, cases and settings."""
        source, option = self.pre_edit_from, "--pre-edit-from"
        assert source is not None
        try:
            other = BenchRunDir(source)
            theirs = other.read_config()
            state = json.loads(other.progress.read_text(encoding="utf-8"))
            files = other.pre_edit.read_texts()
        except FileNotFoundError as error:
            raise ValueError(
                f"{option}: {source} is not a benchmark run with pre-edit results "
                f"({error.filename} is missing)"
            ) from None
        if not state.get("pre_edit"):
            raise ValueError(f"{option}: {source} has not finished its pre-edit evaluation yet")
        mine = json.loads(json.dumps(asdict(self.config)))
        difference = first_difference(theirs["config"], mine, PRE_EDIT_SETTINGS)
        if difference is not None:
            key, stored, value = difference
            raise ValueError(
                f"{option}: {key} differs ({source} has {stored!r}, "
                f"this run {value!r}); its pre-edit results are not this run's"
            )
        fingerprint = environment(loaded)["model_fingerprint"]
        if theirs["environment"]["model_fingerprint"] != fingerprint:
            raise ValueError(f"{option}: {source} evaluated other model weights than this run's")
        return files

    def _run_method(self, loaded: LoadedModel, spec: str, cases: list[EditCase]) -> dict[str, Any]:
        c = self.config
        out = self.layout.method(spec)
        started = time.perf_counter()
        clock = time.perf_counter()
        session = build_session(
            loaded,
            spec,
            preset=load_preset_file(c.preset) if c.preset else None,
            layers=list(c.layers) if c.layers else None,
            corpus=c.corpus,
            stats_tokens=c.stats_tokens,
            stats_pieces=c.stats_pieces,
            stats_samples=c.stats_samples,
            template_tokens=c.template_tokens,
            run_dir=out.journal,
            target_overrides=(
                None
                if c.positions_per_pass is None
                else {"positions_per_pass": c.positions_per_pass or None}
            ),
            seed=c.seed,
            progress=self.progress,
            log=self.log,
            transform_order=c.transform_order or self._journal_order(out),
            precision=c.precision,
        )
        record = MethodRun(spec=spec, layers=list(session.layers))
        self._edited = list(session.layers)
        if c.he_warning:
            record.warning = EnergyWarning(k=c.he_warning)
        record.add_time("statistics", time.perf_counter() - clock)
        for layer, energy in session.energy().items():
            record.energy.append({"edits": 0, "layer": layer, "energy": energy})

        first, final = 0, None
        if self.resume:
            first, final = self._resume_method(loaded, session, record, out, cases)
        starts = range(0, c.n_edits, c.batch_size)[first:]
        bar = Progress(f"{spec} batches", len(starts), enabled=self.progress)
        for begin in starts:
            batch_cases = cases[begin : begin + c.batch_size]
            requests = [case.request for case in batch_cases]
            key, shared = self._shared_targets(spec, session, begin)
            result = session.apply(requests, precomputed_vstar=shared, repeats=c.repeats == "edit")
            if key is not None and shared is None and result.vstar is not None:
                self._first_targets[key] = (spec, result.vstar)
            fault_point("bench-record")
            done = begin + len(batch_cases)
            record.add_batch(
                done,
                result.index,
                result.energy_before,
                result.energy_after,
                result.update_norms,
                result.timings,
                result.target_loss,
                result.target_steps,
                result.warnings,
            )
            for alarm in record.batches[-1].get("he_warnings", []):
                self.log(f"{spec}: {alarm['message']}")
            with session.evaluation_weights():
                final = self._marks(loaded, record, done, cases) or final
            self._write_progress(out, record)
            bar.update(
                bar.done + 1,
                _headline(record.checkpoints[-1]["metrics"]) if record.checkpoints else "",
            )
        bar.close()
        with session.evaluation_weights():
            if final is None:  # resumed after the last batch: evaluate the final model
                final = self._evaluate(loaded, cases)
            clock = time.perf_counter()
            generation = self._generation(loaded, cases)
        record.add_time("generation", time.perf_counter() - clock)
        per_case = merge_results(final, generation) if generation else final
        out.write_cases(per_case)
        summary = {
            "method": spec,
            "layers": record.layers,
            "final": {"protocol": "final", "metrics": aggregate(per_case)},
            "checkpoints": record.checkpoints,
            "general": record.general,
            "energy_final": {
                str(r["layer"]): r["energy"] for r in record.energy if r["edits"] == c.n_edits
            },
            "energy_initial": {
                str(r["layer"]): r["energy"] for r in record.energy if r["edits"] == 0
            },
            "correlations": record.correlations(),
            "intervals": case_intervals(per_case, INTERVAL_KEYS),
            "timings": record.timings,
            "wall_seconds": time.perf_counter() - started,
            "session": session.header(),
        }
        out.write_summary(summary)
        self.log(f"{spec}: {_headline(summary['final']['metrics'])}")
        return summary

    def _journal_order(self, out: MethodDir) -> str | None:
        """A resumed method's schedule order when the config leaves it to the method: the
        one its journal was written with (``"inside"`` before the setting existed)."""
        from ..editing.journal import Journal

        journal = Journal(out.journal)
        if not self.resume or not journal.exists():
            return None
        return journal.index().get("transform_order", "inside")

    def _shared_targets(
        self, spec: str, session: EditSession, begin: int
    ) -> tuple[str | None, VStarResult | None]:
        """(targets key, v* to reuse) for the batch starting at case ``begin``. Every
        method edits the same first batch of the same base model, so a closed-form
        method's v* of it is computed once per targets key and reused by the next ones
        (bitwise what they would compute; tested). (None, None) for any other batch."""
        if begin != 0 or not session.takes_precomputed_vstar:
            return None, None
        key = session.vstar_key()
        owner, shared = self._first_targets.get(key, (None, None))
        if owner is not None:
            self.log(f"{spec}: v* of batch 1 shared with {owner} (same base model, requests "
                     "and target settings)")  # fmt: skip
        return key, shared

    def _marks(
        self,
        loaded: LoadedModel,
        record: MethodRun,
        done: int,
        cases: list[EditCase],
    ) -> list[dict[str, Any]] | None:
        """Checkpoint evaluation and general abilities after ``done`` edits, where due and
        not yet recorded; the per-case results when this is the final model."""
        c = self.config
        final = None
        if done in c.checkpoints() and not any(r["edits"] == done for r in record.checkpoints):
            clock = time.perf_counter()
            so_far = self._evaluate(loaded, cases[:done])
            release_free_memory()
            record.add_time("evaluation", time.perf_counter() - clock)
            record.checkpoints.append(
                {"edits": done, "protocol": "checkpoint", "metrics": aggregate(so_far)}
            )
            if done == c.n_edits:
                final = so_far
        if done in c.general_marks() and not any(r["edits"] == done for r in record.general):
            clock = time.perf_counter()
            record.general.append({"edits": done, **self._general(loaded)})
            record.add_time("general", time.perf_counter() - clock)
        return final

    def _write_progress(self, out: MethodDir, record: MethodRun) -> None:
        out.write_batches(record.batches)
        out.write_checkpoints(record.checkpoints)
        out.write_energy(record.energy)
        out.write_progress(
            {"batches": len(record.batches), "timings": record.timings, "general": record.general},
        )

    # -- resume -----------------------------------------------------------------------------
    #
    # The journal is the source of truth. A method's record (batches.jsonl, he.csv, the
    # batch timings) is rebuilt from its journal, which holds every number those files
    # hold; checkpoints and general abilities (evaluations, not in the journal) are read
    # back and cut to the journal's batches, and one that is due but missing (the run was
    # killed between the journal write and the record write) is evaluated on the model as
    # the journal leaves it, which is the model it would have been evaluated on.

    def _mark(self, *, pre_edit: bool | None = None, method: tuple[str, str] | None = None) -> None:
        if pre_edit is not None:
            self._state["pre_edit"] = pre_edit
        if method is not None:
            self._state["methods"][method[0]] = method[1]
        self.layout.write_progress(self._state)

    def _stored_pre_edit(self) -> dict[str, Any] | None:
        pre_edit = self.layout.pre_edit
        if not self._state.get("pre_edit") or not pre_edit.summary.exists():
            return None
        self.log("pre-edit: results reused from the interrupted run")
        return pre_edit.read_summary()

    def _stored_method(self, spec: str) -> dict[str, Any] | None:
        folder = self.layout.method(spec)
        if self._state["methods"].get(spec) != "complete" or not folder.summary.exists():
            return None
        return folder.read_summary()

    def _resume_method(
        self,
        loaded: LoadedModel,
        session: Any,
        record: MethodRun,
        out: MethodDir,
        cases: list[EditCase],
    ) -> tuple[int, list[dict[str, Any]] | None]:
        """Replay the method's journal onto the model and rebuild its record; return the
        number of batches done and, if that was all of them, the final per-case results."""
        c = self.config
        n_batches = session.resume()
        if n_batches == 0:
            return 0, None
        journal = session.run_dir
        index = session.journal.index()
        starts = list(range(0, c.n_edits, c.batch_size))
        if n_batches > len(starts):
            raise ValueError(
                f"--resume: {journal} holds {n_batches} batches, the run has {len(starts)}"
            )
        expected = [
            [case.request.to_dict() for case in cases[begin : begin + c.batch_size]]
            for begin in starts
        ]
        other = session.journal.mismatched_batch(expected)
        if other is not None:
            raise ValueError(
                f"--resume: batch {other} of {journal} edited other requests "
                "than the data set gives for it; the data set changed"
            )
        done = 0
        for entry, begin in zip(index["batches"], starts, strict=False):
            batch = session.journal.record(entry)
            done = begin + len(expected[begin // c.batch_size])
            energy = entry["energy"]
            record.add_batch(
                done,
                entry["index"],
                {int(k): v["before"] for k, v in energy.items()},
                {int(k): v["after"] for k, v in energy.items()},
                {int(k): v for k, v in batch["update_norms"].items()},
                batch["timings"],
                batch["target_loss"],
                batch["target_steps"],
                batch.get("warnings", []),
            )
        record.checkpoints = [row for row in out.read_checkpoints() if row["edits"] <= done]
        stored = out.read_progress()
        record.general = [row for row in stored.get("general", []) if row["edits"] <= done]
        for phase in ("evaluation", "general"):
            if phase in stored.get("timings", {}):
                record.add_time(phase, stored["timings"][phase])
        with session.evaluation_weights():
            final = self._marks(loaded, record, done, cases)
            if done == c.n_edits and final is None:
                final = self._evaluate(loaded, cases)
        self._write_progress(out, record)
        self.log(f"{record.spec}: resumed after batch {n_batches} ({done} edits) from {journal}")
        return n_batches, final

    def _plots(self) -> None:
        from .plots import plot_run

        try:
            plot_run(self.run_dir)
        except ImportError as error:
            self.log(f"plots skipped: {error}")


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 1024


def _headline(metrics: dict[str, Any]) -> str:
    parts = []
    for name in HEADLINE_METRICS + ("fluency",):
        value = metrics.get(name)
        if value is not None:
            parts.append(f"{name[:4]} {value:.3f}")
    return ", ".join(parts)
