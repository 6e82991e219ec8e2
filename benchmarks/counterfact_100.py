"""CounterFact in one batch: MEMIT, AlphaEdit and AlphaEdit+SPHERE on the embedded SmolLM2.

The first ``--n`` CounterFact cases are applied as ONE batch, by each method in turn,
every time starting from the same base weights (the session is rolled back between
methods and the weights checked bitwise against a copy). The target vectors v* depend
only on the base model and the requests, so they are computed once and handed to every
method (``EditSession.apply(precomputed_vstar=...)``).

Reported for the base model and after each method, as the library scores them
(:func:`sphere_edit.evaluation.metrics.evaluate_cases`, every paraphrase and neighbourhood
prompt of a case, averaged per case and then over cases): efficacy on the rewrite prompt
as P(new) > P(old) (total log-probability of each target's tokens) and as top-1 accuracy
(every target token the argmax under teacher forcing), the same on the paraphrase
prompts, and on the neighbourhood prompts the top-1 accuracy of their true answer and
P(true) > P(new); the hyperspherical-energy change per edited layer; the wall time of
every phase; and the peak resident memory (``ru_maxrss``). The cases are read by
:func:`sphere_edit.evaluation.data.load_cases` (any format ``sphere-edit bench`` reads) and
each method's session is built by :func:`sphere_edit.editing.build.build_session`, as
``sphere-edit edit`` builds it.

    python benchmarks/counterfact_100.py --n 100 --out runs/counterfact_100.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from _output import DATA_HELP, data_folder  # benchmarks/, the script's folder

from sphere_edit.editing.build import MethodSpec, build_session, parse_layers
from sphere_edit.editing.presets import Preset, preset_for
from sphere_edit.editing.requests import validate_batch
from sphere_edit.editing.sampling import generate_context_templates
from sphere_edit.editing.session import BatchResult
from sphere_edit.editing.stats import Corpus, layer_second_moments, load_corpus
from sphere_edit.editing.vstar import VStarConfig, VStarResult, compute_vstar
from sphere_edit.evaluation import data
from sphere_edit.evaluation.data import EditCase
from sphere_edit.evaluation.metrics import aggregate, evaluate_cases
from sphere_edit.model.loading import DEFAULT_MODEL, LoadedModel, load_model

METHODS = ("memit", "alphaedit", "alphaedit+sphere")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if platform.system() == "Darwin" else peak / 1024


# -- data ---------------------------------------------------------------------------------


def load_cases(path: Path, n: int) -> list[EditCase]:
    """The first ``n`` cases of ``path``, checked to be a valid batch; exits with the
    library's one-line message on a bad file."""
    try:
        cases = list(data.load_cases(path, limit=n, download=False))
        validate_batch([c.request for c in cases])
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if len(cases) < n:
        raise SystemExit(f"{path} holds {len(cases)} cases, fewer than --n {n}")
    return cases


# -- options ------------------------------------------------------------------------------


def parse_methods(text: str) -> list[str]:
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one method, e.g. memit,alphaedit+sphere")
    for name in names:
        try:
            MethodSpec.parse(name)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    # fmt: off
    add("--data", type=Path, default=None, help=DATA_HELP)
    add("--n", type=int, default=100, help="number of cases (default 100)")
    add("--model", default=DEFAULT_MODEL, help="model (default %(default)s)")
    add("--layers", default=None,
        help="edited layers, e.g. 3,4,5,6,7 or 3-7 (default: the model's preset)")
    add("--stats-tokens", type=int, default=100_000,
        help="corpus tokens for C0 = E[k kᵀ] (default %(default)s; cached on disk)")
    add("--corpus", type=Path, default=None,
        help="corpus for the statistics (default DATA/corpus/wiki_corpus.jsonl)")
    add("--lr", type=float, default=None,
        help="v* learning rate (default: the model's preset)")
    add("--steps", type=int, default=VStarConfig.steps,
        help="v* optimisation steps (default %(default)s)")
    add("--methods", type=parse_methods, default=list(METHODS),
        help=f"comma-separated method specs (default: {','.join(METHODS)})")
    add("--bf16", action="store_true", help="v* optimisation under bfloat16 autocast")
    add("--batch-size", type=int, default=64,
        help="rows per forward pass in evaluation (default %(default)s)")
    add("--seed", type=int, default=0, help="seed of the context templates (default 0)")
    add("--threads", type=int, default=None,
        help="torch.set_num_threads (default: torch's own default)")
    add("--out", type=Path, default=None, help="write the results as JSON to this path")
    # fmt: on
    return parser


# -- evaluation ---------------------------------------------------------------------------


def evaluate(loaded: LoadedModel, cases: list[EditCase], batch_size: int) -> dict[str, Any]:
    """The library's teacher-forced scores of ``cases``: ``summary`` (the means over cases
    of :func:`.metrics.aggregate`: ``rewrite_top1``, ``rewrite_prob_success``, ...) and
    ``cases`` (one dict per case, every prompt's scores included)."""
    per_case = evaluate_cases(loaded.model, loaded.tokenizer, cases, batch_size=batch_size)
    return {"summary": aggregate(per_case), "cases": per_case}


# -- editing ------------------------------------------------------------------------------


def edited_weights(loaded: LoadedModel, layers: list[int]) -> dict[int, torch.Tensor]:
    return {layer: loaded.layout.mlp_out(layer).weight.detach().clone() for layer in layers}


def run_method(
    name: str,
    preset: Preset,
    loaded: LoadedModel,
    cases: list[EditCase],
    layers: list[int],
    corpus: Corpus,
    stats_tokens: int,
    templates: list[str],
    config: VStarConfig,
    vstar: VStarResult,
    base: dict[int, torch.Tensor],
    batch_size: int,
) -> dict[str, Any]:
    """Apply ``cases`` as one batch with ``name`` (its session built as ``sphere-edit
    edit`` builds it, the statistics read from the cache), score them, roll back and check
    the base weights came back bitwise."""
    session = build_session(
        loaded, name, preset=preset, layers=layers, corpus=corpus, stats_tokens=stats_tokens,
        target_overrides=asdict(config), progress=False, log=lambda _: None,
    )  # fmt: skip
    # The keys must be read over the context templates v* was optimised with.
    session.templates = list(templates)
    method, transform = session.method, session.transform
    clock = time.perf_counter()
    result: BatchResult = session.apply([c.request for c in cases], precomputed_vstar=vstar)
    apply_s = time.perf_counter() - clock
    clock = time.perf_counter()
    metrics = evaluate(loaded, cases, batch_size)
    eval_s = time.perf_counter() - clock
    session.rollback(1)
    for layer, weight in base.items():
        if not torch.equal(loaded.layout.mlp_out(layer).weight, weight):
            raise RuntimeError(f"layer {layer} was not restored to the base weights after {name}")
    timings = {
        "keys": result.timings.get("keys", 0.0),
        "solve": result.timings.get("solve", 0.0),
        "projection": result.timings.get("projection", 0.0),
        "energy": result.timings.get("energy", 0.0),
        "apply_total": apply_s,
        "evaluation": eval_s,
    }
    return {
        "method": method.describe(),
        "transform": asdict(transform) if transform is not None else None,
        "metrics": metrics,
        "energy": {
            str(layer): {
                "before": result.energy_before[layer],
                "after": result.energy_after[layer],
                "change": result.energy_change[layer],
            }
            for layer in layers
        },
        "update_norms": {str(k): v for k, v in result.update_norms.items()},
        "timings": timings,
        "peak_rss_mib": peak_rss_mib(),
    }


# -- report -------------------------------------------------------------------------------


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped or redirected: do not squeeze to 80 columns
        console = Console(width=120)
    layers = report["config"]["layers"]
    metrics = Table(title=f"CounterFact, {report['config']['n']} cases in one batch")
    for column in ("", "eff P>", "eff top1", "para P>", "para top1", "neigh top1", "neigh P>"):
        metrics.add_column(column, justify="left" if not column else "right")

    def row(label: str, m: dict[str, Any]) -> None:
        metrics.add_row(
            label,
            *(f"{100 * m['summary'][key]:.1f}" for key in (
                "rewrite_prob_success", "rewrite_top1",
                "paraphrase_prob_success", "paraphrase_top1",
                "neighborhood_top1", "neighborhood_prob_success",
            )),
        )  # fmt: skip

    row("base (before)", report["baseline"]["metrics"])
    for name, result in report["methods"].items():
        row(name, result["metrics"])
    console.print(metrics)
    console.print(
        "[dim]% (mean over cases of each case's mean over its prompts). eff/para: rewrite/"
        "paraphrase prompts, P(new) > P(old) by total log-prob, and top-1 of every target "
        "token; neigh: neighbourhood prompts, top-1 of their true answer, and "
        "P(true) > P(new).[/dim]"
    )

    energy = Table(title="Hyperspherical energy change (after − before) per layer")
    energy.add_column("")
    for layer in layers:
        energy.add_column(f"L{layer}", justify="right")
    for name, result in report["methods"].items():
        energy.add_row(
            name, *(f"{result['energy'][str(layer)]['change']:+.3e}" for layer in layers)
        )
    if report["methods"]:
        first = next(iter(report["methods"].values()))
        energy.add_row(
            "[dim]HE before[/dim]",
            *(f"[dim]{first['energy'][str(layer)]['before']:.5f}[/dim]" for layer in layers),
        )
    console.print(energy)

    timing = Table(title="Wall time (s) and peak memory")
    timing.add_column("phase")
    timing.add_column("once", justify="right")
    for name in report["methods"]:
        timing.add_column(name, justify="right")
    once = report["timings"]
    names = list(report["methods"])
    for phase in ("load model", "statistics", "context templates", "v*"):
        timing.add_row(phase, f"{once[phase]:.1f}", *("" for _ in names))
    timing.add_row(
        "evaluation (base)", f"{report['baseline']['seconds']:.1f}", *("" for _ in names)
    )
    for phase in ("keys", "solve", "projection", "energy", "evaluation"):
        timing.add_row(phase, "", *(f"{report['methods'][n]['timings'][phase]:.2f}" for n in names))
    timing.add_row(
        "peak RSS (MiB)",
        f"{report['peak_rss_mib']['before_methods']:.0f}",
        *(f"{report['methods'][n]['peak_rss_mib']:.0f}" for n in names),
    )
    console.print(timing)
    vstar = report["vstar"]
    console.print(
        f"v*: {vstar['converged']}/{report['config']['n']} converged, mean final loss "
        f"{vstar['mean_loss']:.3f}, mean NLL {vstar['mean_nll']:.3f}, mean steps "
        f"{vstar['mean_steps']:.1f}; total {report['total_seconds']:.1f} s, "
        f"{report['config']['threads']} threads"
    )


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.n < 1:
        raise SystemExit("--n must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    once: dict[str, float] = {}

    data_dir = data_folder(args.data)
    cases = load_cases(data_dir / "counterfact" / "train.json", args.n)
    requests = [c.request for c in cases]

    clock = time.perf_counter()
    loaded = load_model(args.model)
    once["load model"] = time.perf_counter() - clock
    num_layers = loaded.layout.num_layers
    preset = preset_for(args.model, num_layers)
    layers = parse_layers(args.layers, num_layers) if args.layers else list(preset.layers)
    options: dict[str, Any] = {**preset.target, "steps": args.steps, "bf16": args.bf16}
    if args.lr is not None:
        options["lr"] = args.lr
    config = VStarConfig(**options)
    log(f"{args.model}: editing layers {layers}, {len(cases)} cases, methods {args.methods}")

    corpus_path = args.corpus or data_dir / "corpus" / "wiki_corpus.jsonl"
    clock = time.perf_counter()
    corpus = load_corpus(str(corpus_path))
    # Computed (or read from the cache) once here, so every method's session reads it back.
    found = layer_second_moments(loaded, layers, corpus, max_tokens=args.stats_tokens)
    once["statistics"] = time.perf_counter() - clock
    log(f"statistics: {once['statistics']:.1f} s ({found[layers[0]].count} keys per layer)")

    clock = time.perf_counter()
    templates = generate_context_templates(loaded.model, loaded.tokenizer, seed=args.seed)
    once["context templates"] = time.perf_counter() - clock

    base = edited_weights(loaded, layers)
    clock = time.perf_counter()
    baseline = evaluate(loaded, cases, args.batch_size)
    baseline_s = time.perf_counter() - clock
    log(f"base model evaluated in {baseline_s:.1f} s")

    log(f"v*: {config.steps} steps for {len(cases)} requests ...")
    clock = time.perf_counter()
    vstar = compute_vstar(
        loaded.model, loaded.tokenizer, loaded.layout, layers[-1], requests, templates, config
    )
    once["v*"] = time.perf_counter() - clock
    log(f"v*: {once['v*']:.1f} s, mean final loss {float(vstar.loss.mean()):.3f}")
    rss_before_methods = peak_rss_mib()

    results: dict[str, Any] = {}
    for name in args.methods:
        log(f"{name}: applying and evaluating ...")
        results[name] = run_method(
            name, preset, loaded, cases, layers, corpus, args.stats_tokens, templates, config,
            vstar, base, args.batch_size,
        )  # fmt: skip
        m = results[name]["metrics"]["summary"]
        log(
            f"{name}: efficacy {m['rewrite_prob_success']:.2f}, "
            f"top1 {m['rewrite_top1']:.2f}, "
            f"{results[name]['timings']['apply_total']:.1f} s"
        )

    report = {
        "config": {
            "model": args.model,
            "n": len(cases),
            "layers": layers,
            "stats_tokens": args.stats_tokens,
            "corpus": str(corpus_path),
            "data": str(data_dir),
            "methods": args.methods,
            "preset": preset.name,
            "target": asdict(config),
            "seed": args.seed,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "templates": templates,
        "vstar": {
            "converged": int((vstar.loss < config.loss_tolerance).sum()),
            "mean_loss": float(vstar.loss.mean()),
            "mean_nll": float(vstar.nll.mean()),
            "mean_steps": float(vstar.steps.float().mean()),
            "loss": [float(x) for x in vstar.loss],
            "steps": [int(x) for x in vstar.steps],
            "history": vstar.history,
        },
        "baseline": {"metrics": baseline, "seconds": baseline_s},
        "methods": results,
        "timings": once,
        "peak_rss_mib": {"before_methods": rss_before_methods, "end": peak_rss_mib()},
        "total_seconds": time.perf_counter() - started,
    }
    print_report(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        log(f"results written to {args.out}")
    return report


if __name__ == "__main__":
    main()
