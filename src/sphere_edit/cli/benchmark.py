"""``sphere-edit bench``, ``report`` and ``sweep``: the sequential benchmark and its tables."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..sphere.warning import DEFAULT_K
from .app import (
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
    bench_recipe,
    check_precision,
    check_preset_early,
    check_stats_options,
    console,
    friendly,
    load_for_command,
    locked,
    preset_file,
)


@app.command()
@friendly
@locked
def bench(
    out: Annotated[
        Path | None, typer.Option(help="Run directory: new or empty, or with --resume a run.")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(help="Continue the interrupted run in --out (same options), as edit does."),
    ] = False,
    model: ModelOpt = "smollm2-135m",
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
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
    he_warning: HeWarningOpt = DEFAULT_K,
    general_tasks: Annotated[
        str | None, typer.Option(help="General-abilities tasks, e.g. gsm8k. Default: all.")
    ] = None,
    preset: PresetOpt = None,
    precision: PrecisionOpt = "auto",
    repeats: Annotated[
        str,
        typer.Option(
            help="A batch with two cases of one prompt and subject: 'refuse' (stop before "
            "any work) or 'edit' (both, as the authors' code does)."
        ),
    ] = "refuse",
) -> None:
    """Sequential editing benchmark: every method from the same base model on the same cases."""
    from ..bench.ranks import rank_run_dir
    from ..bench.runner import BenchConfig, Benchmark
    from ..editing.build import parse_layers
    from ..editing.stats_dist import is_writer, rank_device
    from ..evaluation.general import task_list
    from ..model.placement import input_device

    if out is None:
        raise ValueError("--out: give the run directory (a new one, or a run with --resume)")
    run_dir = out
    names = tuple(m.strip() for m in methods.split(",") if m.strip())
    check_stats_options(stats_tokens, stats_pieces, stats_samples, template_tokens)
    check_precision(precision)
    recipe = bench_recipe(stats_pieces, stats_samples, template_tokens)
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
        config, case_order=case_order, he_warning=he_warning, repeats=repeats,
        general_tasks=tuple(task_list(general_tasks)) if general_tasks else None,
    )  # fmt: skip
    _check_bench_data(config)  # a data error before minutes of model loading
    check_preset_early(preset)  # a bad file fails before the model loads
    loaded = load_for_command(model, rank_device(device), device_map)
    preset_file(preset, loaded)
    if resume and precision == "auto":
        precision = _recorded_precision(run_dir) or precision
    config = replace(config, precision=announce_precision(precision, loaded))
    if layers:
        config = replace(config, layers=tuple(parse_layers(layers, loaded.layout.num_layers)))
    # Under torchrun every rank runs the benchmark and rank 0 alone writes and prints.
    writer = is_writer()
    with rank_run_dir(run_dir, input_device(loaded.model), resume=bool(resume)) as own_dir:
        summary = Benchmark(
            config, own_dir, log=console.print if writer else lambda _: None, loaded=loaded,
            resume=bool(resume), pre_edit_from=pre_edit_from, progress=writer,
        ).run()  # fmt: skip
    if not writer:
        return
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


def _recorded_precision(run_dir: Path) -> str | None:
    """The precision a bench run was started with, so that ``--resume`` with the default
    auto continues it as it began on any machine (runs from before it was recorded: fp32)."""
    from ..bench.config import LEGACY_RECIPE
    from ..bench.rundir import BenchRunDir

    layout = BenchRunDir(run_dir)
    if not layout.config.exists():
        return None
    return layout.read_config()["config"].get("precision", LEGACY_RECIPE["precision"])


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
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
    dataset: Annotated[
        str, typer.Option(help="counterfact, multi_counterfact, zsre, or a local file.")
    ] = "counterfact",
    n_edits: Annotated[int, typer.Option(min=1)] = 400,
    batch_size: Annotated[int, typer.Option(min=1)] = 100,
    offset: Annotated[int, typer.Option(min=0, help="Skip the first records.")] = 0,
    corpus: CorpusOpt = None,
    stats_tokens: StatsTokensOpt = None,
    seed: int = 0,
    checkpoint_every: Annotated[
        int | None, typer.Option(min=1, help="Evaluate the edits so far every K edits.")
    ] = None,
    precision: PrecisionOpt = "auto",
) -> None:
    """A grid of SPHERE options: one benchmark run per point, a table and a plot."""
    from ..bench.runner import BenchConfig
    from ..bench.sweep import PLOT_FILE, TABLE_FILE, parse_grid, run_sweep

    axes = parse_grid(grid)
    config = BenchConfig(
        model=model, methods=(method,), dataset=dataset, n_edits=n_edits,
        batch_size=batch_size, seed=seed, offset=offset, corpus=corpus,
        stats_tokens=stats_tokens, checkpoint_every=checkpoint_every,
    )  # fmt: skip
    check_precision(precision)
    _check_bench_data(config)
    loaded = load_for_command(model, device, device_map)
    config = replace(config, precision=announce_precision(precision, loaded))
    run_sweep(config, method, axes, out, resume=resume, loaded=loaded, log=console.print)
    console.print((out / TABLE_FILE).read_text())
    console.print(f"wrote {out / TABLE_FILE} and {out / PLOT_FILE}")
