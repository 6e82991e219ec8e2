"""The ``sphere-edit`` command line."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text
from typer._click import exceptions as usage  # typer vendors click here
from typer.core import TyperGroup

from ..methods.registry import method_help
from ..sphere.warning import DEFAULT_WARMUP


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
    """``--batch-size: 0 is not in the range x>=1`` rather than click's sentence; the old
    ``bench --resume RUN`` spelling says what to give now."""
    ctx = getattr(error, "ctx", None)
    extra = str(getattr(error, "message", ""))
    if ctx is not None and ctx.params.get("resume") is True and "extra argument" in extra:
        given = extra[extra.rfind("(") + 1 : extra.rfind(")")]
        return (
            f"--resume takes no value (got {given!r}); give the run directory as --out: "
            f"--out {given} --resume"
        )
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
    str | None,
    typer.Option(help="Where the model runs: cpu, cuda, cuda:N, or auto (a GPU when there "
                 "is one). MEMIT's and AlphaEdit's solves run there too. Default: cpu."),
]  # fmt: skip
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(help="Spread the model over several devices (accelerate): auto (fill the "
                 "GPUs in order, then the CPU), balanced (an equal share per GPU), or a JSON "
                 "file of module -> device (cpu, cuda:N or N). Not with --device; the edited "
                 "modules must sit on a GPU or, without GPUs, the CPU (never offloaded)."),
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


def load_for_command(model: str, device: str | None = None, device_map: str | None = None):
    from ..model.device_map import describe_device_map
    from ..model.loading import load_model, resolve_device

    if device_map is not None:  # load_model refuses --device with it
        with console.status(Text(f"loading {model} with --device-map {device_map}")):
            loaded = load_model(model, device=device, device_map=device_map)
        assert loaded.device_map is not None
        console.print(f"device map: {describe_device_map(loaded.device_map)}", highlight=False)
        return loaded
    where = resolve_device(device or "cpu")  # a bad --device fails before the model loads
    with console.status(Text(f"loading {model} on {where}")):  # a str would be markup
        return load_model(model, device=where)


def check_preset_early(path: Path | None) -> None:
    """Read the ``--preset`` file once before the model loads, so a bad file fails at once
    (its layers are checked against the model in :func:`preset_file`)."""
    if path is not None:
        from ..editing.presets import load_preset_file

        load_preset_file(path)


def preset_file(path: Path | None, loaded: Any) -> Any:
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


def check_precision(precision: str) -> None:
    """A bad --precision fails before the model loads."""
    from ..common.precision import PRECISIONS

    if precision not in PRECISIONS:
        raise ValueError(
            f"--precision: unknown value {precision!r}; give one of {', '.join(PRECISIONS)}"
        )


def announce_precision(precision: str, loaded: Any) -> str:
    """Resolve --precision for the model's device and print the choice once."""
    from ..common.precision import describe, resolve_precision
    from ..model.placement import input_device

    device = input_device(loaded.model)
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
        from ..editing.stats_dist import is_writer

        resume = kwargs.get("resume")
        run_dir = resume if isinstance(resume, Path) else kwargs.get("out")
        if run_dir is None or (isinstance(resume, Path) and not resume.exists()):
            return fn(*args, **kwargs)  # refused by the command itself
        if not is_writer():  # a torchrun rank other than 0: rank 0 holds the lock
            return fn(*args, **kwargs)
        option = "--resume" if isinstance(resume, Path) else "--out"
        with run_lock(run_dir, option):
            return fn(*args, **kwargs)

    return wrapper


HeWarningOpt = Annotated[
    float,
    typer.Option(
        help="HE early warning: say (and record) when a layer's HE change exceeds K times "
        f"the median of its earlier absolute changes (after a warm-up of {DEFAULT_WARMUP} "
        "batches); 0 turns it off.",
        min=0,
    ),
]


def check_stats_options(
    stats_tokens: int | None,
    stats_pieces: str | None,
    stats_samples: int | None,
    template_tokens: str | None = None,
) -> None:
    """The statistics' and templates' recipe options, before any model work."""
    from ..editing.sampling import parse_template_tokens
    from ..editing.stats import StatsRecipe

    try:
        StatsRecipe.parse(stats_pieces, stats_samples, stats_tokens)
    except ValueError as error:
        field, _, reason = str(error).partition(": ")  # "stats_pieces: ..." -> --stats-pieces
        raise ValueError(f"--{field.replace('_', '-')}: {reason}") from None
    if template_tokens is not None:
        try:
            parse_template_tokens(template_tokens)
        except ValueError as error:
            raise ValueError(f"--template-tokens: {str(error).split(': ', 1)[-1]}") from None


def bench_recipe(
    stats_pieces: str | None, stats_samples: int | None, template_tokens: str | None
) -> dict[str, Any]:
    """The recipe options as BenchConfig records them ("WHOLE" as "whole", "10" as 10)."""
    from ..editing.sampling import parse_template_tokens
    from ..editing.stats import StatsRecipe

    pieces = None if stats_pieces is None else StatsRecipe.parse(stats_pieces).pieces
    tokens = None if template_tokens is None else parse_template_tokens(template_tokens)
    return {"stats_pieces": pieces, "stats_samples": stats_samples, "template_tokens": tokens}


if __name__ == "__main__":  # pragma: no cover
    # Run as a script this file is a second module: the package's app has the commands.
    from sphere_edit.cli import app as registered

    sys.exit(registered())
