"""``sphere-edit stats``, ``energy``, ``geometry``, ``general``, ``trace`` and ``preset``: a
model's or a run's statistics, energy, geometry, general abilities, causal tracing and a
measured preset."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .app import (
    CorpusOpt,
    DeviceMapOpt,
    DeviceOpt,
    ModelOpt,
    PrecisionOpt,
    PresetOpt,
    StatsPiecesOpt,
    StatsSamplesOpt,
    StatsTokensOpt,
    announce_precision,
    app,
    check_precision,
    check_preset_early,
    check_stats_options,
    console,
    friendly,
    load_for_command,
    preset_file,
)


@app.command()
@friendly
def stats(
    model: ModelOpt = "smollm2-135m",
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
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

    check_stats_options(stats_tokens or tokens, stats_pieces, stats_samples)

    check_preset_early(preset)  # a bad file fails before the model loads
    # Under torchrun every rank takes its own GPU and a shard of the corpus.
    loaded = load_for_command(model, rank_device(device), device_map)
    chosen_preset = preset_file(preset, loaded)
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
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
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

    if not layers:
        check_preset_early(preset)  # a bad file fails before the model loads
    loaded = load_for_command(model, device, device_map)
    n = loaded.layout.num_layers
    chosen_preset = preset_file(preset, loaded) if not layers else None
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
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
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
            device=device, device_map=device_map, data_dir=data_dir, n_items=n_items, tasks=chosen,
            batch_size=batch_size, out=out, details=details, plot=plot,
        )  # fmt: skip
        return
    if kind == "edit":
        with console.status(f"loading the edited model of {model_or_run_dir}"):
            loaded, index = load_run_model(
                model_or_run_dir, model=model, device=device, device_map=device_map
            )
        label = f"{model_or_run_dir} ({len(index['batches'])} batches on {loaded.name})"
    else:
        if model is not None:
            raise ValueError("--model is for a run directory; give the model as the argument")
        loaded = load_for_command(model_or_run_dir, device, device_map)
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
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
    precision: PrecisionOpt = "auto",
) -> None:
    """Causal tracing of the MLP states (ROME) on known facts: heatmaps, the indirect
    effect per layer at the last subject token, and a suggested window of layers."""
    from ..analysis.tracing import TraceConfig, default_facts_path, load_facts, run_trace

    check_precision(precision)
    config = TraceConfig(samples=samples, noise_factor=noise, window=window,
                         min_prob=min_prob, seed=seed, n_facts=n_facts)  # fmt: skip
    facts_path = facts or default_facts_path()
    records = load_facts(facts_path)
    loaded = load_for_command(model, device, device_map)
    config = replace(config, bf16=announce_precision(precision, loaded) == "bf16")
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


def _numbers(option: str, text: str, example: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{option}: expected numbers like {example}, got {text!r}") from None


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
        int,
        typer.Option(min=1, help="Candidate windows: the traced one, then shifted ±step, ±2·step."),
    ] = 3,
    window_step: Annotated[
        int, typer.Option(min=1, help="Layers between neighbouring candidate windows.")
    ] = 2,
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
    lr_scales: Annotated[
        str,
        typer.Option(help="Factors on each window's v* lr (from --lr-rule), comma-separated."),
    ] = "1",
    lr_rule: Annotated[
        str,
        typer.Option(
            help="How a window's v* lr follows its residual, against SmolLM2's: median (the "
            "median |coordinate|, robust to a few massive coordinates) or rms (the norm over "
            "sqrt(hidden), the first rule)."
        ),
    ] = "median",
    corpus: CorpusOpt = None,
    stats_tokens: Annotated[
        int, typer.Option(min=1000, help="Corpus tokens for C0 during the sweep.")
    ] = 30_000,
    seed: int = 0,
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
    precision: PrecisionOpt = "auto",
) -> None:
    """Write a preset for a model from measurements: causal tracing picks a window, a
    short MEMIT sweep on CounterFact cases picks the window, v* lr and λ."""
    from ..analysis.preset_search import SearchConfig, search_preset
    from ..analysis.tracing import default_facts_path, load_facts
    from ..evaluation.data import load_cases

    weights = _numbers("--mom2-weights", mom2_weights, "1000,5000")
    scales = _numbers("--lr-scales", lr_scales, "1,0.25")
    config = SearchConfig(n_facts=n_facts, samples=samples, window=window, windows=windows,
                          window_step=window_step, lr_scales=scales, cases=cases, offset=offset,
                          mom2_weights=weights, stats_tokens=stats_tokens, seed=seed,
                          min_prob=min_prob, lr_rule=lr_rule)  # fmt: skip
    if out.exists() and out.is_dir():
        raise ValueError(f"--out: {out} is a folder; give a file name such as my-model.json")
    facts_path = facts or default_facts_path()
    records = load_facts(facts_path)
    from ..evaluation.data import data_root

    dataset = dataset or data_root() / "counterfact" / "train.json"
    case_set = load_cases(dataset, limit=cases, offset=offset)
    if len(case_set) < cases:
        raise ValueError(f"--cases: {dataset} gives {len(case_set)} cases from offset {offset}")
    check_precision(precision)
    loaded = load_for_command(model, device, device_map)
    config = replace(config, precision=announce_precision(precision, loaded))
    data = search_preset(
        loaded, records, list(case_set), config, out, corpus=corpus,
        facts_source=str(facts_path), dataset_source=str(case_set.path), log=console.print,
    )  # fmt: skip
    chosen = data["measurements"]["chosen"]
    console.print(f"chosen: layers {chosen['layers'][0]}-{chosen['layers'][-1]}, v* lr "
                  f"{chosen['lr']:.3g}, mom2_weight {chosen['mom2_weight']:g}")  # fmt: skip
    console.print(f"wrote {out}; use it with --preset {out}")
