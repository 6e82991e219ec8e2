"""``sphere-edit demo`` and ``edit``: sequential editing from the command line, and the
checks a run directory, an export target and a resumed journal get before any model work."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from ..common.fileio import run_dir_entries
from ..methods.registry import get_method, options_help
from ..sphere.warning import DEFAULT_K
from .app import (
    METHOD_HELP,
    CorpusOpt,
    DeviceMapOpt,
    DeviceOpt,
    HeWarningOpt,
    ModelOpt,
    PositionsOpt,
    PrecisionOpt,
    PresetOpt,
    StatsPiecesOpt,
    StatsSamplesOpt,
    StatsTokensOpt,
    TemplateTokensOpt,
    TransformOrderOpt,
    announce_precision,
    app,
    check_precision,
    check_preset_early,
    check_stats_options,
    console,
    friendly,
    load_for_command,
    locked,
    parse_options,
    preset_file,
)


@app.command()
@friendly
def demo(
    model: ModelOpt = "smollm2-135m",
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
    method: Annotated[str, typer.Option(help=METHOD_HELP)] = ("alphaedit+sphere"),
    corpus: CorpusOpt = None,
    stats_tokens: StatsTokensOpt = None,
    stats_pieces: StatsPiecesOpt = None,
    stats_samples: StatsSamplesOpt = None,
    template_tokens: TemplateTokensOpt = None,
    out: Annotated[Path | None, typer.Option(help="Write the journal here.")] = None,
    precision: PrecisionOpt = "auto",
    preset: PresetOpt = None,
) -> None:
    """Edit a dozen facts in three batches and show completions and HE before and after."""
    from .demo import run_demo

    check_stats_options(stats_tokens, stats_pieces, stats_samples, template_tokens)
    check_precision(precision)
    check_preset_early(preset)  # a bad file fails before the model loads
    loaded = load_for_command(model, device, device_map)
    chosen = announce_precision(precision, loaded)
    run_demo(
        loaded, method, corpus=corpus, stats_tokens=stats_tokens,
        preset=preset_file(preset, loaded),
        run_dir=str(out) if out else None, console=Console(),  # the demo's text is markup
        recipe={"stats_pieces": stats_pieces, "stats_samples": stats_samples,
                "template_tokens": template_tokens},
        precision=chosen,
    )  # fmt: skip


@app.command()
@friendly
@locked
def edit(
    requests: Annotated[Path, typer.Option(help="JSON list or JSONL of edit requests.")],
    out: Annotated[Path, typer.Option(help="Run directory for the journal and deltas.")],
    model: ModelOpt = "smollm2-135m",
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
    method: Annotated[str, typer.Option(help=METHOD_HELP)] = ("alphaedit+sphere"),
    batch_size: Annotated[int, typer.Option(min=1)] = 100,
    layers: Annotated[
        str | None, typer.Option(help="e.g. '3,4,5' or '3-7'; one layer for rome and ft.")
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            help="Method option KEY=VALUE (JSON value), e.g. epsilon=null; repeatable. "
            f"Options: {options_help()}."
        ),
    ] = None,
    eta: Annotated[
        float | None,
        typer.Option(help="SPHERE eigenvalue share, in (0, 1]. Default: the preset's."),
    ] = None,
    alpha: Annotated[
        float | None, typer.Option(help="SPHERE strength, in [0, 1]. Default: the preset's.")
    ] = None,
    basis: Annotated[
        str | None, typer.Option(help="SPHERE basis: current (default) or pre_edit.")
    ] = None,
    corpus: CorpusOpt = None,
    stats_tokens: StatsTokensOpt = None,
    stats_pieces: StatsPiecesOpt = None,
    stats_samples: StatsSamplesOpt = None,
    template_tokens: TemplateTokensOpt = None,
    lr: Annotated[
        float | None, typer.Option(help="v* learning rate. Default: the preset's.")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, help="v* Adam steps. Default: the preset's.")
    ] = None,
    precision: PrecisionOpt = "auto",
    # The old switch, kept for scripts: --bf16 is --precision bf16.
    bf16: Annotated[bool, typer.Option(hidden=True)] = False,
    positions_per_pass: PositionsOpt = None,
    export: Annotated[Path | None, typer.Option(help="Also save_pretrained here.")] = None,
    seed: int = 0,
    transform_order: TransformOrderOpt = None,
    resume: Annotated[
        bool,
        typer.Option(help="Continue an interrupted run in --out after its last journaled batch."),
    ] = False,
    he_warning: HeWarningOpt = DEFAULT_K,
    preset: PresetOpt = None,
) -> None:
    """Apply edit requests sequentially in batches, journaling every batch."""
    from ..common.fileio import atomic_dir
    from ..editing.build import MethodSpec, build_session, parse_layers
    from ..editing.requests import load_requests, validate_batch
    from ..editing.text import check_targets

    spec = MethodSpec.parse(method)
    method_overrides = parse_options(option or [])
    get_method(spec.method).validate(method_overrides)  # a bad --option fails before loading
    if eta is not None and not 0 < eta <= 1:
        raise ValueError(f"--eta must be in (0, 1], got {eta}")
    if alpha is not None and not 0 <= alpha <= 1:
        raise ValueError(f"--alpha must be in [0, 1], got {alpha}")
    if basis is not None and basis not in ("current", "pre_edit"):
        raise ValueError(f"--basis must be 'current' or 'pre_edit', got {basis!r}")
    if transform_order not in (None, "inside", "after"):
        raise ValueError(f"--transform-order must be 'inside' or 'after', got {transform_order!r}")
    _check_edit_options(spec, layers, eta=eta, alpha=alpha, basis=basis)
    check_stats_options(stats_tokens, stats_pieces, stats_samples, template_tokens)
    _check_run_dir(out, resume)
    precision = "bf16" if bf16 else precision
    check_precision(precision)
    if export is not None:
        _check_export(export)
    check_preset_early(preset)  # a bad file fails before the model loads
    all_requests = load_requests(requests)
    batches = [all_requests[i : i + batch_size] for i in range(0, len(all_requests), batch_size)]
    for b, batch in enumerate(batches):
        try:
            validate_batch(batch)
        except ValueError as error:
            raise ValueError(f"batch {b + 1}: {error}") from None
    if resume:
        _check_resumed_batches(out, batches)
    loaded = load_for_command(model, device, device_map)
    check_targets(loaded.tokenizer, all_requests)
    if resume:
        _check_resume_header(out, loaded, corpus, stats_tokens)
        _check_resume_recipe(out, loaded, stats_pieces, stats_samples)
    overrides = {k: v for k, v in {"lr": lr, "steps": steps}.items() if v is not None}
    if positions_per_pass is not None:
        overrides["positions_per_pass"] = positions_per_pass or None  # 0: no cap
    if resume and precision == "auto":
        precision = _recorded_precision(out) or precision
    chosen = announce_precision(precision, loaded)
    session = build_session(
        loaded, spec, preset=preset_file(preset, loaded),
        layers=parse_layers(layers, loaded.layout.num_layers) if layers else None,
        corpus=corpus, stats_tokens=stats_tokens, eta=eta, alpha=alpha, basis=basis or "current",
        target_overrides=overrides, method_overrides=method_overrides, run_dir=out,
        seed=seed, log=console.print, stats_pieces=stats_pieces, stats_samples=stats_samples,
        template_tokens=template_tokens, precision=chosen, transform_order=transform_order,
    )  # fmt: skip
    done = _resume_edit(session, batches) if resume else 0
    alarm_rule = _he_warning_rule(he_warning, session, done)
    console.print(f"{spec} on layers {session.layers}: {len(all_requests)} requests, "
                  f"{len(batches)} batches")  # fmt: skip
    for batch in batches[done:]:
        start = time.perf_counter()
        result = session.apply(batch)
        change = ", ".join(f"L{k} {v:+.2e}" for k, v in result.energy_change.items())
        console.print(
            f"batch {result.index}/{len(batches)}: {len(batch)} edits in "
            f"{time.perf_counter() - start:.1f}s; HE change {change}"
        )
        _report_unconverged(batch, result.target_loss, session.target.loss_tolerance)
        if alarm_rule is not None:
            _record_he_warnings(out, alarm_rule.update(result.energy_change))
    if export:
        with atomic_dir(export) as folder:
            session.export(folder)
        console.print(f"edited model saved to {export}")
    console.print(f"journal in {out}")


HE_WARNINGS = "he_warnings.jsonl"  # an edit run's alarms, one JSON object a line


def _he_warning_rule(k: float, session: Any, done: int) -> Any:
    """The early-warning rule for ``edit --he-warning K`` (None when K is 0), fed the HE
    changes of the ``done`` batches a resumed run replayed, so it judges as if unbroken."""
    from ..sphere.warning import EnergyWarning

    if not k:
        return None
    rule = EnergyWarning(k=k)
    for entry in session.journal.index()["batches"][:done] if done else []:
        rule.update({int(n): v["after"] - v["before"] for n, v in entry["energy"].items()})
    return rule


def _record_he_warnings(out: Path, alarms: list[Any]) -> None:
    """Print each alarm and append it to the run's he_warnings.jsonl."""
    from ..bench.rundir import read_jsonl, write_jsonl

    if not alarms:
        return
    rows = read_jsonl(out / HE_WARNINGS)
    for alarm in alarms:
        console.print(alarm.message())
        rows.append({**alarm.to_dict(), "message": alarm.message()})
    write_jsonl(out / HE_WARNINGS, rows)


def _check_edit_options(
    spec: Any, layers: str | None, *, eta: float | None, alpha: float | None, basis: str | None
) -> None:
    """Options that would otherwise be ignored in silence."""
    if layers is not None and not layers.strip():
        raise ValueError(
            "--layers: empty; give e.g. '3,4,5' or '3-7', or leave it out for the preset's layers"
        )
    if not spec.sphere:
        given = [
            n for n, v in (("--eta", eta), ("--alpha", alpha), ("--basis", basis)) if v is not None
        ]
        if given:
            raise ValueError(
                f"{given[0]}: a SPHERE option, but --method {spec} has no SPHERE projection; "
                f"use --method {spec}+sphere or drop {given[0]}"
            )


def _check_run_dir(out: Path, resume: bool) -> None:
    """``--out`` must be a new or empty folder, or with ``--resume`` an edit run."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file; give a directory")
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"--out: {out} is not writable; give a folder you can write in")
    from ..bench.rundir import find_run_kind

    kind = find_run_kind(out)
    if kind == "bench":
        raise ValueError(f"--out: {out} is a benchmark run; give a new directory for an edit run")
    if kind == "edit":
        if not resume:
            raise ValueError(
                f"--out {out} already holds a run; choose a new directory or continue it "
                "with --resume"
            )
        return
    if (out / "batches").exists():
        raise ValueError(
            f"--out: {out} holds batches/ but no session.json (a run killed before its "
            "first batch was journaled, or a damaged one); nothing in it can be resumed: "
            f"move {out / 'batches'} away (or delete it) and run again"
        )
    others = run_dir_entries(out)
    if resume and others:
        raise ValueError(
            f"--resume: {out} is not an edit run (no session.json) and not empty (it holds "
            f"{others[0]!r}); give the run's directory, or a new or empty one"
        )


def _check_export(export: Path) -> None:
    """The export target, before any model work: absent or an empty folder."""
    if export.exists() and not export.is_dir():
        raise ValueError(f"--export: {export} is a file; give a new folder")
    if export.exists() and any(export.iterdir()):
        raise ValueError(f"--export: {export} is not empty; give a new or empty folder")
    parent = export.parent if export.parent != Path("") else Path(".")
    existing = next((p for p in (parent, *parent.parents) if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ValueError(f"--export: cannot create {export}: {existing} is not a writable folder")


def _check_resumed_batches(out: Path, batches: list[list[Any]]) -> None:
    """Before any model work: every journaled batch's request file is readable and holds
    the requests this request file gives for it."""
    from ..editing.journal import Journal

    journal = Journal(out)
    if not journal.exists():
        return
    done = len(journal.index()["batches"])
    if done > len(batches):
        raise ValueError(
            f"--resume: {out} holds {done} batches, the request file gives {len(batches)}"
        )
    other = journal.mismatched_batch([[r.to_dict() for r in b] for b in batches])
    if other is not None:
        raise ValueError(
            f"--resume: batch {other} in {out} holds other requests than this request file "
            "gives for it; use the same file and --batch-size"
        )


def _recorded_precision(out: Path) -> str | None:
    """The precision a run in ``out`` was recorded with (its journal's v* settings), so
    that ``--resume`` with the default auto continues it as it began, on any machine."""
    from ..editing.journal import read_index

    if not (out / "session.json").exists():
        return None
    target = read_index(out).get("target")
    if not isinstance(target, dict):
        return None
    return "bf16" if target.get("bf16") else "fp32"


def _check_resume_header(
    out: Path, loaded: Any, corpus: str | None, stats_tokens: int | None
) -> None:
    """Before the statistics pass: the model, corpus file and statistics size of a resumed
    run must be the journal's (the session checks the rest when it resumes)."""
    from ..common.fileio import sha256_file
    from ..editing.journal import read_index, require_base

    if not (out / "session.json").exists():
        return
    index = read_index(out)
    require_base(out, index, loaded.fingerprint)
    recorded = index.get("stats_tokens")
    if stats_tokens is not None and recorded is not None and stats_tokens != recorded:
        raise ValueError(
            f"--stats-tokens: the run in {out} used {recorded}, this command gives "
            f"{stats_tokens}; give --stats-tokens {recorded} to resume it"
        )
    known = index.get("corpus_fingerprint")
    if corpus is not None and known is not None and Path(corpus).is_file():
        if sha256_file(corpus) != known:
            raise ValueError(
                f"--corpus: {corpus} is not the corpus the run in {out} used "
                f"({index.get('corpus')}); give that corpus to resume it"
            )


def _check_resume_recipe(
    out: Path, loaded: Any, stats_pieces: str | None, stats_samples: int | None
) -> None:
    """Before the statistics pass: a resumed run keeps its statistics recipe. A journal
    without recipe fields used the 256-token pieces counted in tokens."""
    from ..editing.journal import read_index
    from ..editing.presets import preset_for
    from ..editing.stats import StatsRecipe

    if not (out / "session.json").exists():
        return
    index = read_index(out)
    if index.get("stats_tokens") is None and index.get("stats_samples") is None:
        return  # the method computed no statistics
    if stats_pieces is None:
        stats_pieces = preset_for(
            loaded.name, loaded.layout.num_layers, loaded.model.config
        ).stats_pieces
    mine = StatsRecipe.parse(stats_pieces, stats_samples)
    recorded = index.get("stats_pieces", "256")
    if mine.pieces != recorded:
        raise ValueError(
            f"--stats-pieces: the run in {out} used {recorded}, this command gives "
            f"{mine.pieces}; give --stats-pieces {recorded} to resume it"
        )
    if index.get("stats_samples") != mine.samples:
        raise ValueError(
            f"--stats-samples: the run in {out} used {index.get('stats_samples')}, this "
            f"command gives {mine.samples}; repeat the run's --stats-samples to resume it"
        )


def _report_unconverged(batch: list[Any], losses: list[float] | None, tolerance: float) -> None:
    """Name the requests whose v* ended above its loss tolerance: their edit may not take."""
    for request, loss in zip(batch, losses or [], strict=False):
        if loss is not None and loss > tolerance:
            console.print(
                f"  not converged: {request.subject!r} ({request.target_new!r}) v* loss "
                f"{loss:.3g} > tolerance {tolerance:.3g}; this edit may not take (try more "
                "--steps or a larger --lr)"
            )


def _resume_edit(session: Any, batches: list[list[Any]]) -> int:
    """Replay the journal of an interrupted ``edit`` run (its batches, checked before any
    model work, are the first batches of this request file with this batch size)."""
    done = session.resume()  # its batches were checked by _check_resumed_batches
    if done == 0:
        return 0
    console.print(f"resumed: {done} of {len(batches)} batches already in {session.run_dir}")
    return done
