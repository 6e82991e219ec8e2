"""The ``sphere-edit`` command line."""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer._click import exceptions as usage  # typer vendors click here
from typer.core import TyperGroup

from ..common.fileio import run_dir_entries
from ..methods.registry import get_method, method_help, options_help


class _OneLineUsageErrors(TyperGroup):
    """Typer's usage errors (a bad value, an unknown or missing option) as one line,
    like every other error, instead of a boxed panel; the exit code stays 2."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        _hide_flag_metavars(self)
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except usage.NoArgsIsHelpError as error:
            error.show()  # the help page, as before
            sys.exit(error.exit_code)
        except usage.ClickException as error:
            err.print(
                Text("error: ", style="red") + Text(_usage_message(error)),
                highlight=False,
                soft_wrap=True,
            )
            sys.exit(error.exit_code)
        except typer.Abort:
            err.print("aborted", highlight=False)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _hide_flag_metavars(group: TyperGroup) -> None:
    """A boolean flag takes no value: show no ``<bool>`` after it in the help."""
    for command in [group, *group.commands.values()]:
        for param in command.params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""


def _usage_message(error: usage.ClickException) -> str:
    """``--batch-size: 0 is not in the range x>=1`` rather than click's sentence."""
    param = getattr(error, "param", None)
    if (
        isinstance(error, usage.BadParameter)
        and not isinstance(error, usage.MissingParameter)
        and param is not None
        and param.opts
    ):
        name = max(param.opts, key=len)
        return f"{name}: {error.message}"
    return " ".join(error.format_message().split()).rstrip(".")


app = typer.Typer(
    cls=_OneLineUsageErrors,
    add_completion=False,
    rich_markup_mode=None,
    no_args_is_help=True,
    help="Sequential knowledge editing of language models with the SPHERE projection.",
)
# No markup: subjects, paths and model names are user text and print as they are.
console = Console(markup=False)
err = Console(stderr=True, markup=False)
DEBUG = {"on": False}
METHOD_HELP = method_help()

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Embedded name, local folder or hub id.")
]
CorpusOpt = Annotated[
    str | None,
    typer.Option(help="Text for key statistics: .jsonl/.txt file or hub dataset name. "
                 "Default: text sampled from the model."),
]  # fmt: skip


DeviceOpt = Annotated[
    str,
    typer.Option(help="Where the model runs: cpu, cuda, cuda:N, or auto (a GPU when there "
                 "is one). The closed-form solves stay on the CPU in float64."),
]  # fmt: skip
StatsTokensOpt = Annotated[
    int | None,
    typer.Option(min=1000, help="Corpus tokens for the key statistics C0. Default: the preset's."),
]
StatsPiecesOpt = Annotated[
    str | None,
    typer.Option(help="How the corpus is cut for C0: whole (each text up to the model's "
                 "context, the authors' recipe) or 256 (256-token pieces, the old recipe). "
                 "Default: the preset's (whole)."),
]  # fmt: skip
StatsSamplesOpt = Annotated[
    int | None,
    typer.Option(min=1, help="C0 over the first N corpus texts instead of --stats-tokens."),
]
TemplateTokensOpt = Annotated[
    str | None,
    typer.Option(help="New tokens per context template: authors (10 minus the start word's "
                 "tokens, as in MEMIT) or a count (10: the old recipe). Default: the preset's."),
]  # fmt: skip
PrecisionOpt = Annotated[
    str,
    typer.Option(help="Arithmetic of the v* and key passes: auto (bf16 where the hardware has "
                 "native bf16 and it measures at least 2x fp32), fp32 or bf16. Solves, "
                 "statistics and the projection stay float32/float64."),
]  # fmt: skip
PresetOpt = Annotated[
    Path | None,
    typer.Option(help="Preset file: JSON like the shipped presets, or an EasyEdit hparams "
                 ".yaml. Default: the model's shipped preset."),
]  # fmt: skip
PositionsOpt = Annotated[
    int | None,
    typer.Option(min=0, help="Cap on rows × tail positions per v* pass (peak memory); 0: no cap."),
]


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    DEBUG["on"] = debug


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One-line errors with a non-zero exit code; ``--debug`` shows the traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            err.print("interrupted; completed batches are in the journal")
            raise typer.Exit(130) from None
        except Exception as error:  # noqa: BLE001 - the CLI boundary
            if DEBUG["on"]:
                traceback.print_exc()
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            err.print(Text("error: ", style="red") + Text(message), highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["epsilon=null", "steps=10"]`` -> ``{"epsilon": None, "steps": 10}``; a value
    that is not JSON stays a string."""
    import json

    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option: expected KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def _load(model: str, device: str = "cpu"):
    from ..model.loading import load_model, resolve_device

    where = resolve_device(device)  # a bad --device fails before the model loads
    with console.status(Text(f"loading {model} on {where}")):  # a str would be markup
        return load_model(model, device=where)


def _preset_file(path: Path | None, loaded: Any) -> Any:
    """The ``--preset`` file checked against the model, its EasyEdit mapping printed;
    ``None`` without ``--preset``."""
    if path is None:
        return None
    from ..editing.presets import check_preset_layers, load_preset_file

    preset = load_preset_file(path)
    for line in preset.mapping:
        console.print(f"  {line}")
    check_preset_layers(preset, loaded.layout.num_layers)
    console.print(f"preset: {preset.name} (file {path})")
    return preset


@app.command()
@friendly
def demo(
    model: ModelOpt = "smollm2-135m",
    device: DeviceOpt = "cpu",
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

    _check_stats_options(stats_tokens, stats_pieces, stats_samples, template_tokens)
    _check_precision(precision)
    if preset is not None:
        from ..editing.presets import load_preset_file

        load_preset_file(preset)  # a bad file fails before the model loads
    loaded = _load(model, device)
    chosen = _announce_precision(precision, loaded)
    run_demo(
        loaded, method, corpus=corpus, stats_tokens=stats_tokens,
        preset=_preset_file(preset, loaded),
        run_dir=str(out) if out else None, console=Console(),  # the demo's text is markup
        recipe={"stats_pieces": stats_pieces, "stats_samples": stats_samples,
                "template_tokens": template_tokens},
        precision=chosen,
    )  # fmt: skip


def _check_precision(precision: str) -> None:
    """A bad --precision fails before the model loads."""
    from ..common.precision import PRECISIONS

    if precision not in PRECISIONS:
        raise ValueError(
            f"--precision: unknown value {precision!r}; give one of {', '.join(PRECISIONS)}"
        )


def _announce_precision(precision: str, loaded: Any) -> str:
    """Resolve --precision for the model's device and print the choice once."""
    from ..common.precision import describe, resolve_precision

    device = next(loaded.model.parameters()).device
    chosen = resolve_precision(precision, device)
    console.print(describe(chosen, device, requested=precision), highlight=False)
    return chosen


TransformOrderOpt = Annotated[
    str | None,
    typer.Option(
        help="inside|after: SPHERE and RECT's mask on each layer's update inside MEMIT's "
        "schedule (later layers compensate) or after it (the authors'). Default: the method's."
    ),
]


def locked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run the command holding its run directory's lock (``--resume DIR`` or ``--out``):
    one writer per run directory; a second process is refused naming the first's PID."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..common.fileio import run_lock

        resume = kwargs.get("resume")
        run_dir = resume if isinstance(resume, Path) else kwargs.get("out")
        if run_dir is None or (isinstance(resume, Path) and not resume.exists()):
            return fn(*args, **kwargs)  # refused by the command itself
        option = "--resume" if isinstance(resume, Path) else "--out"
        with run_lock(run_dir, option):
            return fn(*args, **kwargs)

    return wrapper


HeWarningOpt = Annotated[
    float | None,
    typer.Option(
        help="HE early warning: say (and record) when a layer's HE change exceeds K times "
        "the median of its earlier absolute changes (after a warm-up of 5 batches). "
        "Off by default."
    ),
]


@app.command()
@friendly
@locked
def edit(
    requests: Annotated[Path, typer.Option(help="JSON list or JSONL of edit requests.")],
    out: Annotated[Path, typer.Option(help="Run directory for the journal and deltas.")],
    model: ModelOpt = "smollm2-135m",
    device: DeviceOpt = "cpu",
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
    he_warning: HeWarningOpt = None,
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
    _check_stats_options(stats_tokens, stats_pieces, stats_samples, template_tokens)
    if he_warning is not None and not he_warning > 0:
        raise ValueError(f"--he-warning: must be positive, got {he_warning}; e.g. 5")
    _check_run_dir(out, resume)
    precision = "bf16" if bf16 else precision
    _check_precision(precision)
    if export is not None:
        _check_export(export)
    if preset is not None:
        from ..editing.presets import load_preset_file

        load_preset_file(preset)  # a bad file fails before the model loads
    all_requests = load_requests(requests)
    batches = [all_requests[i : i + batch_size] for i in range(0, len(all_requests), batch_size)]
    for b, batch in enumerate(batches):
        try:
            validate_batch(batch)
        except ValueError as error:
            raise ValueError(f"batch {b + 1}: {error}") from None
    if resume:
        _check_resumed_batches(out, batches)
    loaded = _load(model, device)
    check_targets(loaded.tokenizer, all_requests)
    if resume:
        _check_resume_header(out, loaded, corpus, stats_tokens)
        _check_resume_recipe(out, loaded, stats_pieces, stats_samples)
    overrides = {k: v for k, v in {"lr": lr, "steps": steps}.items() if v is not None}
    if positions_per_pass is not None:
        overrides["positions_per_pass"] = positions_per_pass or None  # 0: no cap
    if resume and precision == "auto":
        precision = _recorded_precision(out) or precision
    chosen = _announce_precision(precision, loaded)
    session = build_session(
        loaded, spec, preset=_preset_file(preset, loaded),
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


def _he_warning_rule(k: float | None, session: Any, done: int) -> Any:
    """The early-warning rule for ``edit --he-warning K`` (None when off), fed the HE
    changes of the ``done`` batches a resumed run replayed, so it judges as if unbroken."""
    from ..sphere.warning import EnergyWarning

    if k is None:
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


def _check_stats_options(
    stats_tokens: int | None,
    stats_pieces: str | None,
    stats_samples: int | None,
    template_tokens: str | None = None,
) -> None:
    """The statistics' and templates' recipe options, before any model work."""
    from ..editing.sampling import parse_template_tokens
    from ..editing.stats import StatsRecipe

    if stats_tokens is not None and stats_samples is not None:
        raise ValueError("--stats-samples: give either --stats-tokens or --stats-samples, not both")
    try:
        StatsRecipe.parse(stats_pieces, stats_samples)
    except ValueError as error:
        raise ValueError(f"--stats-pieces: {str(error).split(': ', 1)[-1]}") from None
    if template_tokens is not None:
        try:
            parse_template_tokens(template_tokens)
        except ValueError as error:
            raise ValueError(f"--template-tokens: {str(error).split(': ', 1)[-1]}") from None


def _bench_recipe(
    stats_pieces: str | None, stats_samples: int | None, template_tokens: str | None
) -> dict[str, Any]:
    """The recipe options as BenchConfig records them ("WHOLE" as "whole", "10" as 10)."""
    from ..editing.sampling import parse_template_tokens
    from ..editing.stats import StatsRecipe

    pieces = None if stats_pieces is None else StatsRecipe.parse(stats_pieces).pieces
    tokens = None if template_tokens is None else parse_template_tokens(template_tokens)
    return {"stats_pieces": pieces, "stats_samples": stats_samples, "template_tokens": tokens}


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


@app.command()
@friendly
def stats(
    model: ModelOpt = "smollm2-135m",
    device: DeviceOpt = "cpu",
    layers: Annotated[str | None, typer.Option(help="Default: the preset's layers.")] = None,
    corpus: CorpusOpt = None,
    stats_tokens: StatsTokensOpt = None,
    stats_pieces: StatsPiecesOpt = None,
    stats_samples: StatsSamplesOpt = None,
    tokens: Annotated[int | None, typer.Option(min=1000, hidden=True)] = None,  # old name
    preset: PresetOpt = None,
) -> None:
    """Precompute (and cache) the key statistics C0 = E[k kᵀ] of the edited layers."""
    from ..editing.build import parse_layers
    from ..editing.presets import describe_choice, preset_for
    from ..editing.stats import (
        StatsRecipe,
        layer_second_moments,
        load_corpus,
        stats_cache_path,
        weights_dtype,
    )
    from ..editing.stats_dist import rank_device

    _check_stats_options(stats_tokens or tokens, stats_pieces, stats_samples)

    # Under torchrun every rank takes its own GPU and a shard of the corpus.
    loaded = _load(model, rank_device(device))
    chosen_preset = _preset_file(preset, loaded)
    if chosen_preset is None:
        chosen_preset = preset_for(loaded.name, loaded.layout.num_layers, loaded.model.config)
        console.print(describe_choice(chosen_preset))
    chosen = (
        parse_layers(layers, loaded.layout.num_layers) if layers else list(chosen_preset.layers)
    )
    source = load_corpus(corpus, loaded)
    console.print(f"statistics: {source.description}")
    recipe = StatsRecipe.parse(
        chosen_preset.stats_pieces if stats_pieces is None else stats_pieces, stats_samples
    )
    n_tokens = None if stats_samples else stats_tokens or tokens or chosen_preset.stats_tokens
    start = time.perf_counter()
    moments = layer_second_moments(loaded, chosen, source, max_tokens=n_tokens, recipe=recipe)
    elapsed = time.perf_counter() - start
    for layer, moment in moments.items():
        dtype = weights_dtype(loaded)
        path = stats_cache_path(
            loaded.fingerprint, source.fingerprint, layer, n_tokens, dtype, recipe
        )
        console.print(f"layer {layer}: {moment.count} keys -> {path}")
    console.print(f"done in {elapsed:.1f}s")


@app.command()
@friendly
def energy(
    model: ModelOpt = "smollm2-135m",
    device: DeviceOpt = "cpu",
    layers: Annotated[str | None, typer.Option(help="Default: the preset's layers.")] = None,
    run: Annotated[Path | None, typer.Option(help="An edit run: its HE journal.")] = None,
    s: Annotated[float, typer.Option(min=0.0, help="Riesz exponent; 0 = log energy.")] = 1.0,
    preset: PresetOpt = None,
) -> None:
    """Print the hyperspherical energy of a model's layers, or the HE series of a run."""
    if run is not None:
        from ..bench.rundir import expect_run
        from ..editing.journal import read_index

        index = read_index(expect_run(run, "edit"))
        table = Table(title=f"HE per batch: {run} ({index.get('method_spec', '')})")
        table.add_column("batch")
        for layer in index["layers"]:
            table.add_column(f"layer {layer}", justify="right")
        for entry in index["batches"]:
            row = entry.get("energy", {})
            table.add_row(
                str(entry["index"]),
                *[
                    f"{row[str(layer)]['after']:.6f} ({row[str(layer)]['change']:+.2e})"
                    if str(layer) in row else "-"
                    for layer in index["layers"]
                ],
            )  # fmt: skip
        console.print(table)
        return
    from ..editing.build import parse_layers
    from ..editing.presets import describe_choice, preset_for
    from ..sphere.energy import hyperspherical_energy

    loaded = _load(model, device)
    n = loaded.layout.num_layers
    chosen_preset = _preset_file(preset, loaded) if not layers else None
    if chosen_preset is None:
        chosen_preset = preset_for(loaded.name, n, loaded.model.config)
        if not layers:
            console.print(describe_choice(chosen_preset))
    chosen = parse_layers(layers, n) if layers else list(chosen_preset.layers)
    table = Table(title=f"Hyperspherical energy (s={s}) of {loaded.name}")
    table.add_column("layer")
    table.add_column("module")
    table.add_column("HE", justify="right")
    for layer in chosen:
        value = hyperspherical_energy(loaded.layout.read_weight(layer), s)
        table.add_row(str(layer), loaded.layout.mlp_out_weight_name(layer), f"{value:.6f}")
    console.print(table)


# -- geometry and general abilities ---------------------------------------------------------


@app.command()
@friendly
def geometry(
    run_dir: Annotated[
        Path, typer.Argument(help="An edit run (holds session.json) or a benchmark run.")
    ],
    max_neurons: Annotated[
        int, typer.Option(min=2, help="Neurons sampled for the pairwise views of big layers.")
    ] = 512,
    out: Annotated[Path | None, typer.Option(help="Default: RUN_DIR/geometry.")] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Base model, if not the one recorded.")
    ] = None,
    tsne: Annotated[bool, typer.Option(help="Draw the t-SNE plot (the slow part).")] = True,
    seed: int = 0,
) -> None:
    """Weight geometry of a run's edited layers, before and after (PNGs and summary.json);
    for a benchmark run directory, of every method (into RUN/<method>/geometry)."""
    from ..bench.geometry import geometry_for_bench, geometry_for_run
    from ..bench.rundir import run_kind
    from ..editing.journal import read_index

    if run_kind(run_dir) == "bench":
        if out is not None:
            raise ValueError(
                "--out: a benchmark run writes each method's geometry to RUN/<method>/geometry"
            )
        with console.status(f"replaying the methods of {run_dir}"):
            summaries = geometry_for_bench(run_dir, max_neurons, model=model, seed=seed, tsne=tsne)
        for spec, summary in summaries.items():
            _print_geometry(f"{spec}: {summary['run_dir']}", summary)
        return
    index = read_index(run_dir)
    with console.status(f"loading {model or index['model']} and replaying {run_dir}"):
        summary = geometry_for_run(run_dir, out, max_neurons, model=model, seed=seed, tsne=tsne)
    _print_geometry(str(run_dir), summary)


def _print_geometry(name: str, summary: dict) -> None:
    table = Table(title=f"Weight geometry: {name} ({summary['n_batches']} batches)")
    for column in ("layer", "HE pre", "HE post", "relative change", "mean angle pre/post",
                   "min angle pre/post", "neurons shown"):  # fmt: skip
        table.add_column(column, justify="right")
    for layer, result in summary["layers"].items():
        change = result["he_relative_change"]
        table.add_row(
            layer, f"{result['he_pre']:.6f}", f"{result['he_post']:.6f}",
            "-" if change is None else f"{change:+.3e}",
            f"{result['angles_pre']['mean']:.2f}° / {result['angles_post']['mean']:.2f}°",
            f"{result['angles_pre']['min']:.2f}° / {result['angles_post']['min']:.2f}°",
            f"{result['n_sampled']}/{result['n_neurons']}",
        )  # fmt: skip
    console.print(table)
    console.print(f"figures and summary.json in {summary['out_dir']}")


@app.command()
@friendly
def general(
    model_or_run_dir: Annotated[
        str, typer.Argument(help="Embedded name, local folder, hub id, or an edit run directory.")
    ],
    data: Annotated[
        Path | None,
        typer.Option(
            help="Folder with the RECT files (or its parent holding general/). "
            "Default: $SPHERE_EDIT_DATA."
        ),
    ] = None,
    n_items: Annotated[int, typer.Option(min=1, help="First N items of each task.")] = 200,
    tasks: Annotated[str, typer.Option(help="Comma-separated: gsm8k,rte,nq,boolq.")] = (
        "gsm8k,rte,nq,boolq"
    ),
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="For a run directory: base model, if not the one recorded."
        ),
    ] = None,
    device: DeviceOpt = "cpu",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write the results here as JSON; with --edits after every point, and the "
            "points it already holds are not measured again."
        ),
    ] = None,
    details: Annotated[bool, typer.Option(help="Keep every item's output in --out.")] = False,
    edits: Annotated[
        str | None,
        typer.Option(
            help="For a run directory: comma-separated edit counts (batch ends; 0 = the base "
            "model) to evaluate after, e.g. 0,200,400. Default: after all batches."
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(help="With --edits: the curve as PNG. Default: --out's name with .png."),
    ] = None,
) -> None:
    """Zero-shot GSM8K, RTE, NQ and BoolQ (RECT protocol) of a model or an edit run."""
    from ..bench.rundir import expect_run, find_run_kind, run_kind
    from ..common.fileio import write_json
    from ..editing.runs import load_run_model
    from ..evaluation.general import evaluate_general, resolve_data_dir

    chosen = [t.strip() for t in tasks.split(",") if t.strip()]
    if plot is not None and edits is None:
        raise ValueError("--plot draws the curve of --edits; give --edits too")
    # Without --edits the argument may be a model (a name or a model folder) instead.
    kind = run_kind(model_or_run_dir) if edits is not None else find_run_kind(model_or_run_dir)
    if kind == "bench":
        expect_run(model_or_run_dir, "edit")
    data_dir = resolve_data_dir(data)
    if edits is not None:
        _general_curve(
            Path(model_or_run_dir), _parse_counts(edits, "--edits"), model=model,
            device=device, data_dir=data_dir, n_items=n_items, tasks=chosen,
            batch_size=batch_size, out=out, details=details, plot=plot,
        )  # fmt: skip
        return
    if kind == "edit":
        with console.status(f"loading the edited model of {model_or_run_dir}"):
            loaded, index = load_run_model(model_or_run_dir, model=model, device=device)
        label = f"{model_or_run_dir} ({len(index['batches'])} batches on {loaded.name})"
    else:
        if model is not None:
            raise ValueError("--model is for a run directory; give the model as the argument")
        loaded = _load(model_or_run_dir, device)
        label = loaded.name
    result = evaluate_general(
        loaded.model, loaded.tokenizer, data_dir, n_items=n_items, tasks=chosen,
        batch_size=batch_size, details=details, log=console.print,
    )  # fmt: skip
    result["model"] = label
    table = Table(title=f"General abilities of {label} (first {n_items} items)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result["summary"].items():
        if value is None:
            shown = "-"
        elif isinstance(value, float):
            shown = f"{value:.3f}"
        else:
            shown = str(value)
        table.add_row(key, shown)
    console.print(table)
    console.print(f"done in {result['seconds']:.1f}s")
    if out is not None:
        write_json(out, result)
        console.print(f"results in {out}")


def _parse_counts(text: str, option: str) -> list[int]:
    """``"0,200,400"`` -> ``[0, 200, 400]``."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated integers, got {text!r}") from None


def _general_curve(
    run_dir: Path, counts: list[int], *, out: Path | None, plot: Path | None, **options: Any
) -> None:
    """``general --edits``: the curve, its table and its plot."""
    from ..bench.plots import plot_general
    from ..evaluation.general import accuracy_keys, general_curve

    curve = general_curve(run_dir, counts, out=out, log=console.print, **options)
    points = curve["points"]
    keys = accuracy_keys(point["summary"] for point in points)
    table = Table(title=f"General abilities along {run_dir} (first {curve['n_items']} items)")
    table.add_column("edits", justify="right")
    for key in keys:
        table.add_column(key, justify="right")
    for point in points:
        values = [point["summary"].get(key) for key in keys]
        table.add_row(str(point["edits"]), *("-" if v is None else f"{v:.3f}" for v in values))
    console.print(table)
    if out is not None:
        console.print(f"results in {out}")
    plot = plot or (out.with_suffix(".png") if out is not None else None)
    if plot is not None:
        label = curve["method"] or run_dir.name
        if plot_general({label: points}, plot) is not None:
            console.print(f"plot in {plot}")


@app.command()
@friendly
@locked
def bench(
    out: Annotated[Path | None, typer.Option(help="Run directory (must be new or empty).")] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue the interrupted run in this directory (same options)."),
    ] = None,
    model: ModelOpt = "smollm2-135m",
    device: DeviceOpt = "cpu",
    methods: Annotated[
        str, typer.Option(help="Comma-separated, e.g. memit,alphaedit,alphaedit+sphere.")
    ] = "memit,alphaedit,alphaedit+sphere",
    dataset: Annotated[
        str, typer.Option(help="counterfact, multi_counterfact, zsre, or a local file.")
    ] = "counterfact",
    n_edits: Annotated[int, typer.Option(min=1)] = 1000,
    batch_size: Annotated[int, typer.Option(min=1)] = 100,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="Evaluate the cases edited so far every K edits.")
    ] = None,
    offset: Annotated[int, typer.Option(min=0, help="Skip the first records.")] = 0,
    layers: Annotated[str | None, typer.Option(help="Default: the preset's.")] = None,
    corpus: CorpusOpt = None,
    stats_tokens: StatsTokensOpt = None,
    stats_pieces: StatsPiecesOpt = None,
    stats_samples: StatsSamplesOpt = None,
    template_tokens: TemplateTokensOpt = None,
    fluency_cases: Annotated[
        int, typer.Option(min=0, help="Generate (fluency, consistency) for the first K cases.")
    ] = 0,
    general_every: Annotated[
        int | None, typer.Option(help="General abilities every K edits (and pre-edit).")
    ] = None,
    general_data: Annotated[str | None, typer.Option(help="Folder of the task files.")] = None,
    general_items: Annotated[int, typer.Option(min=1)] = 200,
    skip_invalid: Annotated[
        bool, typer.Option(help="Report and skip malformed records instead of stopping.")
    ] = False,
    seed: int = 0,
    positions_per_pass: PositionsOpt = None,
    transform_order: TransformOrderOpt = None,
    pre_edit_from: Annotated[
        Path | None,
        typer.Option(
            help="Reuse the pre-edit results of this run (same model, cases and evaluation "
            "settings; e.g. the same benchmark of other methods run in parallel)."
        ),
    ] = None,
    case_order: Annotated[
        str | None,
        typer.Option(help="'file' (default) or 'shuffle:SEED': a seeded shuffle of the cases."),
    ] = None,
    he_warning: HeWarningOpt = None,
    general_tasks: Annotated[
        str | None, typer.Option(help="General-abilities tasks, e.g. gsm8k. Default: all.")
    ] = None,
    preset: PresetOpt = None,
) -> None:
    """Sequential editing benchmark: every method from the same base model on the same cases."""
    from ..bench.runner import BenchConfig, Benchmark
    from ..editing.build import parse_layers
    from ..evaluation.general import task_list

    if out is None and resume is None:
        raise ValueError("--out: give a new run directory (or --resume RUN_DIR)")
    if out is not None and resume is not None and out.resolve() != resume.resolve():
        raise ValueError(f"--resume {resume} and --out {out} differ; give one run directory")
    run_dir = resume if resume is not None else out
    assert run_dir is not None
    names = tuple(m.strip() for m in methods.split(",") if m.strip())
    _check_stats_options(stats_tokens, stats_pieces, stats_samples, template_tokens)
    recipe = _bench_recipe(stats_pieces, stats_samples, template_tokens)
    config = BenchConfig(
        model=model, methods=names, dataset=dataset, n_edits=n_edits, batch_size=batch_size,
        checkpoint_every=checkpoint_every, seed=seed, offset=offset, corpus=corpus,
        stats_tokens=stats_tokens, fluency_cases=fluency_cases, general_every=general_every,
        general_data=general_data, general_items=general_items, skip_invalid=skip_invalid,
        positions_per_pass=positions_per_pass, transform_order=transform_order,
        preset=str(preset) if preset else None,
        **{k: v for k, v in recipe.items() if v is not None},
    )  # fmt: skip
    config = replace(
        config, case_order=case_order, he_warning=he_warning,
        general_tasks=tuple(task_list(general_tasks)) if general_tasks else None,
    )  # fmt: skip
    _check_bench_data(config)  # a data error before minutes of model loading
    if preset is not None:
        from ..editing.presets import load_preset_file

        load_preset_file(preset)  # a bad file fails before the model loads
    loaded = _load(model, device)
    _preset_file(preset, loaded)
    if layers:
        config = replace(config, layers=tuple(parse_layers(layers, loaded.layout.num_layers)))
    bench_run = Benchmark(
        config,
        run_dir,
        log=console.print,
        loaded=loaded,
        resume=bool(resume),
        pre_edit_from=pre_edit_from,
    )
    summary = bench_run.run()
    _print_table([run_dir])
    _print_intervals([run_dir])
    console.print(f"run directory {run_dir}; {summary['wall_seconds']:.0f}s")


def _check_bench_data(config: Any) -> None:
    """Read the benchmark's records as the run will, so that a malformed record or too
    few cases stop it before the model loads; a bad record is named as a user finds it."""
    from ..evaluation.data import DatasetError, load_cases

    try:
        case_set = load_cases(
            config.dataset, limit=config.n_edits, offset=config.offset,
            skip_invalid=config.skip_invalid,
        )  # fmt: skip
    except DatasetError as error:
        if error.index is None:
            raise
        where = f"record {error.index} (counting from 0: record 0 is the file's first)"
        if error.case_id is not None:
            where += f", case_id {error.case_id!r}"
        if error.field is not None:
            where += f", field '{error.field}'"
        raise ValueError(
            f"--dataset {error.path}: {where}: {error.reason}; fix the record, or pass "
            "--skip-invalid to leave malformed records out"
        ) from None
    if len(case_set) < config.n_edits:
        raise ValueError(
            f"--n-edits: {config.dataset} gives {len(case_set)} valid cases from offset "
            f"{config.offset}, fewer than {config.n_edits}; lower --n-edits or --offset"
        )


def _print_table(run_dirs: list[Path]) -> None:
    """The paper-style table, one per column group (model, data set, edits) so that it
    fits a terminal."""
    from ..bench.report import IN_PROGRESS, group_runs, legend, missing_reasons, table

    groups, header, rows = table(run_dirs)
    grouped = group_runs(run_dirs)
    width = (len(header) - 1) // len(groups)
    for g, label in enumerate(groups):
        columns = range(1 + g * width, 1 + (g + 1) * width)
        shown = Table(title=f"{label}: final model, every edited case (×100)")
        shown.add_column("method", justify="left")
        for c in columns:
            shown.add_column(header[c].rsplit(" ", 1)[-1], justify="right")
        starred = False
        for row in rows:
            if row[columns[0]] == "–":
                continue  # a method of another group
            starred |= row[columns[0]].endswith("*")
            shown.add_row(row[0], *(row[c] for c in columns))
        notes = [legend(grouped[label]), *missing_reasons(grouped[label])]
        shown.caption = "\n".join([*notes, IN_PROGRESS] if starred else notes)
        shown.caption_justify = "left"
        console.print(shown)


@app.command()
@friendly
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Benchmark run directories.")],
    out: Annotated[Path, typer.Option(help="HTML file to write.")] = Path("report.html"),
) -> None:
    """One self-contained HTML page (plots embedded) and the paper-style table."""
    from ..bench.report import build_report
    from ..bench.rundir import expect_run
    from ..common.fileio import write_text

    for run_dir in run_dirs:
        expect_run(run_dir, "bench")
    write_text(out, build_report(run_dirs))
    _print_table(run_dirs)
    _print_intervals(run_dirs)
    _print_plugin_table(run_dirs)
    console.print(f"report in {out}")


def _print_intervals(run_dirs: list[Path]) -> None:
    """The edit metrics with their bootstrap intervals, per run and finished method, as
    "mean ±half-width" so that the table fits 80 columns (the HTML report and summary.json
    hold the exact, possibly asymmetric, [low, high])."""
    from ..bench.analysis import run_intervals
    from ..bench.report import COLUMNS

    columns = [(label, key) for label, key in COLUMNS if key not in ("fluency", "consistency")]
    several = len(run_dirs) > 1
    shown = Table(
        title="95% bootstrap intervals over cases (×100): mean ±half-width",
        caption="1,000 resamples of the cases, seed 0, final model; exact [low, high] "
        "intervals (and Flu., Consis.) in the HTML report",
    )
    if several:
        shown.add_column("run", justify="left")
    shown.add_column("method", justify="left")
    for label, _ in columns:
        shown.add_column(label, justify="right")
    for run_dir in run_dirs:
        for name, intervals in run_intervals(run_dir, [key for _, key in columns]).items():
            cells = []
            for _, key in columns:
                entry = intervals.get(key)
                half = None if not entry else 50 * (entry["high"] - entry["low"])
                cells.append("–" if not entry else f"{100 * entry['mean']:.1f}±{half:.1f}")
            shown.add_row(*([Path(run_dir).name] if several else []), name, *cells)
    if shown.row_count:
        shown.caption_justify = "left"
        console.print(shown)


def _print_plugin_table(run_dirs: list[Path]) -> None:
    """Methods run both without and with +sphere: each metric and the relative change."""
    from ..bench.report import plugin_table

    header, rows = plugin_table(run_dirs)
    if not rows:
        return
    shown = Table(title="SPHERE as a plug-in: without → with (relative change %), ×100")
    shown.add_column("method", justify="left")
    shown.add_column("edits", justify="right")
    metrics = range(3, len(header), 3)  # (without, with, change) per metric
    for first in metrics:
        shown.add_column(header[first], justify="right")
    for row in rows:
        cells = [f"{row[i]} → {row[i + 1]} ({row[i + 2]})" for i in metrics]
        shown.add_row(row[1], row[2], *cells)
    console.print(shown)


@app.command()
@friendly
def trace(
    model: Annotated[str, typer.Argument(help="Embedded name, local folder or hub id.")],
    out: Annotated[Path, typer.Option(help="Folder for trace.json and trace.png.")],
    facts: Annotated[
        Path | None,
        typer.Option(
            help="JSON or JSONL records with subject, prompt and attribute. "
            "Default: $SPHERE_EDIT_DATA/knowns/known_1000.json."
        ),
    ] = None,  # fmt: skip
    n_facts: Annotated[int | None, typer.Option(min=1, help="Trace at most this many.")] = None,
    samples: Annotated[int, typer.Option(min=1, help="Noise draws per fact.")] = 10,
    window: Annotated[
        int, typer.Option(min=1, help="Layers restored together; width of the suggestion.")
    ] = 5,
    min_prob: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Known: top-1 and P(true) above this.")
    ] = 0.1,
    noise: Annotated[
        float, typer.Option(min=0.0, help="Noise std in embedding-output stds.")
    ] = 3.0,
    seed: int = 0,
    device: DeviceOpt = "cpu",
) -> None:
    """Causal tracing of the MLP states (ROME) on known facts: heatmaps, the indirect
    effect per layer at the last subject token, and a suggested window of layers."""
    from ..analysis.tracing import TraceConfig, default_facts_path, load_facts, run_trace

    config = TraceConfig(samples=samples, noise_factor=noise, window=window,
                         min_prob=min_prob, seed=seed, n_facts=n_facts)  # fmt: skip
    facts_path = facts or default_facts_path()
    records = load_facts(facts_path)
    loaded = _load(model, device)
    result = run_trace(loaded, records, config, out, facts_source=str(facts_path))
    counts = result["counts"]
    console.print(f"known facts: {counts['facts_known']} of {counts['facts_checked']} checked "
                  f"({counts['facts_read']} read); traced {counts['facts_traced']}")  # fmt: skip
    table = Table(title=f"Average indirect effect at the last subject token: {loaded.name}")
    for column in ("layer", "single layer", f"window of {window}"):
        table.add_column(column, justify="right")
    curves = result["last_subject_token"]
    for layer in range(result["n_layers"]):
        table.add_row(
            str(layer), f"{curves['single'][layer]:.4f}", f"{curves['window'][layer]:.4f}"
        )
    console.print(table)
    layers = result["suggested_layers"]
    console.print(f"suggested layers: {layers[0]}-{layers[-1]} ({result['suggestion_rule']})")
    console.print(f"wrote {out / 'trace.json'} and {out / 'trace.png'}")


@app.command()
@friendly
@locked
def sweep(
    out: Annotated[Path, typer.Option(help="Sweep directory (new or empty, unless --resume).")],
    method: Annotated[
        str, typer.Option(help="A SPHERE spec, e.g. alphaedit+sphere or memit+sphere-solve.")
    ],
    grid: Annotated[
        list[str],
        typer.Option(
            help="name=v1,v2 (repeat per axis), e.g. --grid alpha=0.3,0.5 --grid eta=0.5."
        ),
    ],
    resume: Annotated[bool, typer.Option(help="Skip finished points, continue the rest.")] = False,
    model: ModelOpt = "smollm2-135m",
    device: DeviceOpt = "cpu",
    dataset: Annotated[
        str, typer.Option(help="counterfact, multi_counterfact, zsre, or a local file.")
    ] = "counterfact",
    n_edits: Annotated[int, typer.Option(min=1)] = 400,
    batch_size: Annotated[int, typer.Option(min=1)] = 100,
    offset: Annotated[int, typer.Option(min=0, help="Skip the first records.")] = 0,
    corpus: CorpusOpt = None,
    stats_tokens: StatsTokensOpt = None,
    seed: int = 0,
) -> None:
    """A grid of SPHERE options: one benchmark run per point, a table and a plot."""
    from ..bench.runner import BenchConfig
    from ..bench.sweep import PLOT_FILE, TABLE_FILE, parse_grid, run_sweep

    axes = parse_grid(grid)
    config = BenchConfig(
        model=model, methods=(method,), dataset=dataset, n_edits=n_edits,
        batch_size=batch_size, seed=seed, offset=offset, corpus=corpus,
        stats_tokens=stats_tokens,
    )  # fmt: skip
    _check_bench_data(config)
    loaded = _load(model, device)
    run_sweep(config, method, axes, out, resume=resume, loaded=loaded, log=console.print)
    console.print((out / TABLE_FILE).read_text())
    console.print(f"wrote {out / TABLE_FILE} and {out / PLOT_FILE}")


@app.command()
@friendly
def preset(
    model: Annotated[str, typer.Argument(help="Embedded name, local folder or hub id.")],
    out: Annotated[Path, typer.Option(help="The preset file to write (JSON).")],
    facts: Annotated[
        Path | None,
        typer.Option(
            help="Known facts to trace. Default: $SPHERE_EDIT_DATA/knowns/known_1000.json."
        ),
    ] = None,
    n_facts: Annotated[int, typer.Option(min=1, help="Facts traced.")] = 8,
    samples: Annotated[int, typer.Option(min=1, help="Noise draws per traced fact.")] = 3,
    min_prob: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Known: top-1 and P(true) above this.")
    ] = 0.1,
    window: Annotated[int, typer.Option(min=1, help="Layers per candidate window.")] = 5,
    windows: Annotated[
        int, typer.Option(min=1, help="Candidate windows: the traced one, then shifted ±2, ±4.")
    ] = 3,
    dataset: Annotated[
        Path | None,
        typer.Option(
            help="CounterFact cases of the sweep. Default: "
            "$SPHERE_EDIT_DATA/counterfact/train.json."
        ),
    ] = None,
    cases: Annotated[
        int, typer.Option(min=1, help="Cases edited in one batch per candidate.")
    ] = 24,
    offset: Annotated[int, typer.Option(min=0, help="Skip the first records.")] = 0,
    mom2_weights: Annotated[
        str, typer.Option(help="MEMIT's λ values, comma-separated.")
    ] = "1000,5000,15000",
    corpus: CorpusOpt = None,
    stats_tokens: Annotated[
        int, typer.Option(min=1000, help="Corpus tokens for C0 during the sweep.")
    ] = 30_000,
    seed: int = 0,
    device: DeviceOpt = "cpu",
) -> None:
    """Write a preset for a model from measurements: causal tracing picks a window, a
    short MEMIT sweep on CounterFact cases picks the window, v* lr and λ."""
    from ..analysis.preset_search import SearchConfig, search_preset
    from ..analysis.tracing import default_facts_path, load_facts
    from ..evaluation.data import load_cases

    try:
        weights = tuple(float(w) for w in mom2_weights.split(",") if w.strip())
    except ValueError:
        raise ValueError(
            f"--mom2-weights: expected numbers like 1000,5000, got {mom2_weights!r}"
        ) from None
    config = SearchConfig(n_facts=n_facts, samples=samples, window=window, windows=windows,
                          cases=cases, offset=offset, mom2_weights=weights,
                          stats_tokens=stats_tokens, seed=seed, min_prob=min_prob)  # fmt: skip
    if out.exists() and out.is_dir():
        raise ValueError(f"--out: {out} is a folder; give a file name such as my-model.json")
    facts_path = facts or default_facts_path()
    records = load_facts(facts_path)
    from ..evaluation.data import data_root

    dataset = dataset or data_root() / "counterfact" / "train.json"
    case_set = load_cases(dataset, limit=cases, offset=offset)
    if len(case_set) < cases:
        raise ValueError(f"--cases: {dataset} gives {len(case_set)} cases from offset {offset}")
    loaded = _load(model, device)
    data = search_preset(
        loaded, records, list(case_set), config, out, corpus=corpus,
        facts_source=str(facts_path), dataset_source=str(case_set.path), log=console.print,
    )  # fmt: skip
    chosen = data["measurements"]["chosen"]
    console.print(f"chosen: layers {chosen['layers'][0]}-{chosen['layers'][-1]}, v* lr "
                  f"{chosen['lr']:.3g}, mom2_weight {chosen['mom2_weight']:g}")  # fmt: skip
    console.print(f"wrote {out}; use it with --preset {out}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
