"""UltraEdit against AlphaEdit: seconds per batch of CounterFact edits, and what they hold.

The first ``--n`` cases of ``DATA/counterfact/train.json`` go in as one batch, each method
on the same base model (rolled back between them, checked bitwise), its session built by
:func:`sphere_edit.editing.build.build_session` with the model's preset and the method's
own layers. Printed per method: the seconds of ``session.apply`` (C0, a one-off cost
that is cached on disk, is read before the clock starts) with its phases, and efficacy,
paraphrase and neighbourhood top-1 of those cases after the batch; then the ratio of the
times. The CPU's vector flags and the load average are printed first: the machine is
shared, and the times mean little without them. ``--ultraedit-lr`` takes several values
for a small sweep.

    python benchmarks/ultraedit_speed.py --n 100 --out runs/ultraedit_speed.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
from _output import DATA_HELP, data_folder, print_and_save  # benchmarks/, the script's folder

from sphere_edit.common.precision import resolve_precision
from sphere_edit.editing.build import build_session, parse_layers
from sphere_edit.editing.journal import snapshot_weights
from sphere_edit.editing.presets import preset_for
from sphere_edit.editing.stats import load_corpus
from sphere_edit.evaluation.data import load_cases
from sphere_edit.evaluation.metrics import aggregate, evaluate_cases
from sphere_edit.model.loading import DEFAULT_MODEL, LoadedModel, load_model

# The vector extensions that decide how fast the float32 and float64 kernels run.
VECTOR_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
METRICS = ("rewrite_top1", "paraphrase_top1", "neighborhood_top1")


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])  # fmt: skip
    return " ".join(flag for flag in VECTOR_FLAGS if flag in flags) or "none of the listed"


def scores(loaded: LoadedModel, cases: list, batch_size: int) -> dict[str, float]:
    per_case = evaluate_cases(loaded.model, loaded.tokenizer, cases, batch_size=batch_size)
    summary = aggregate(per_case)
    return {name: float(summary[name]) for name in METRICS}


def run_one(
    loaded: LoadedModel, spec: str, cases: list, args: argparse.Namespace, corpus: Any, **options
) -> dict[str, Any]:
    """One batch of ``cases`` with ``spec``; its seconds and scores; rolled back after."""
    layers = None
    if spec.startswith("ultraedit") and args.ultraedit_layers:
        layers = parse_layers(args.ultraedit_layers, loaded.layout.num_layers)
    session = build_session(
        loaded, spec, corpus=corpus, stats_tokens=args.stats_tokens, method_overrides=options,
        seed=0, progress=False, log=lambda _: None, layers=layers, precision=args.precision,
    )  # fmt: skip
    session.context_templates()  # sampled once per session, not part of a batch's cost
    base = snapshot_weights(loaded.layout, session.layers, session.modules)
    clock = time.perf_counter()
    result = session.apply([case.request for case in cases])
    seconds = time.perf_counter() - clock
    after = scores(loaded, cases, args.batch_size)
    session.rollback(1)
    for key, weight in base.items():
        module = loaded.layout.mlp_out(key) if isinstance(key, int) else loaded.layout.module(*key)
        if not torch.equal(module.weight, weight):
            raise RuntimeError(f"{spec}: {key} was not restored to the base weights")
    phases = {k: round(v, 3) for k, v in result.timings.items()}
    return {"layers": session.layers, "modules": list(session.modules),
            "seconds": seconds, "phases": phases, **after}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", default=DEFAULT_MODEL)
    add("--data", type=Path, default=None, help=DATA_HELP)
    add("--n", type=int, default=100, help="cases in the one batch (default %(default)s)")
    add("--stats-tokens", type=int, default=100_000, help="corpus tokens for AlphaEdit's C0")
    add("--ultraedit-lr", default=None, help="comma-separated lr values (default: its default)")
    add("--no-alphaedit", action="store_true", help="time UltraEdit alone (an lr sweep)")
    add(
        "--standardised-solve",
        action="store_true",
        help="UltraEdit's option standardised_solve=true (the first reading)",
    )
    add("--ultraedit-layers", default=None, help="e.g. 8-15 (default: the method's band)")
    add("--corpus", default=None, help="AlphaEdit's C0 text (default: sampled from the model)")
    add("--batch-size", type=int, default=64, help="rows per evaluation pass")
    add("--threads", type=int, default=None, help="torch.set_num_threads")
    add("--precision", default="auto", help="both methods' passes: auto, fp32 or bf16")
    add("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"cpu vector flags: {cpu_flags()}")
    print(f"load average (1, 5, 15 min): {os.getloadavg()}, cores {os.cpu_count()}, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    data = data_folder(args.data)
    loaded = load_model(args.model)
    cases = list(load_cases(data / "counterfact" / "train.json", limit=args.n, download=False))
    preset = preset_for(loaded.name, loaded.layout.num_layers, loaded.model.config)
    precision = resolve_precision(args.precision, "cpu")
    print(f"precision: {precision} (--precision {args.precision})")
    result: dict[str, Any] = {"model": loaded.name, "preset": preset.name, "n": len(cases),
                              "precision": precision}  # fmt: skip
    result["base"] = scores(loaded, cases, args.batch_size)
    print(f"base: {result['base']}")

    lrs = [float(x) for x in args.ultraedit_lr.split(",")] if args.ultraedit_lr else [None]
    for lr in lrs:
        name = "ultraedit" if lr is None else f"ultraedit lr={lr:g}"
        options: dict[str, Any] = {} if lr is None else {"lr": lr}
        if args.standardised_solve:
            options["standardised_solve"] = True
            name += " standardised"
        result[name] = run_one(loaded, "ultraedit", cases, args, None, **options)
        print(f"{name}: {result[name]}", flush=True)
    if not args.no_alphaedit:
        corpus = load_corpus(args.corpus, loaded, seed=0)
        # C0 is read (or computed and cached) here, before any clock starts.
        build_session(loaded, "alphaedit", corpus=corpus, stats_tokens=args.stats_tokens,
                      progress=False, log=lambda _: None)  # fmt: skip
        result["alphaedit"] = run_one(loaded, "alphaedit", cases, args, corpus)
        print(f"alphaedit: {result['alphaedit']}", flush=True)
        first = next(k for k in result if k.startswith("ultraedit"))
        result["alphaedit_over_ultraedit"] = (
            result["alphaedit"]["seconds"] / result[first]["seconds"]
        )
    result["load_average_after"] = list(os.getloadavg())
    print_and_save({k: v for k, v in result.items() if not isinstance(v, dict)}, args.out)
    if args.out:
        import json

        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
