"""How many v* steps each request needs, and what the optimiser variants change.

For the first ``--n`` CounterFact train records on SmolLM2 (preset layers and v* options),
v* runs once per ``--optimizers`` entry (``VStarConfig.optimizer``) on the same requests
and templates. Per request, from the loss after every step (``VStarResult.trace``):

- ``steps``: the steps it took (it stops once its loss is under the tolerance);
- ``steps_to_1pct``: the first step whose loss is within 1 % of the loss it ends at, i.e.
  how many of the steps were needed for what the run achieved.

Printed per optimiser: the mean / median / 90th percentile of both, the mean final NLL
and loss, how many requests reached the tolerance, and the seconds.

    python benchmarks/vstar_steps.py --n 100 --optimizers adam,adam-warm,adam-adapt

An entry ``name:K`` runs that optimiser with at most K steps (e.g. ``adam-warm:12``), and
``name:K:LR`` also with learning rate LR, to see whether a schedule reaches the same loss in
fewer passes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from sphere_edit.common.precision import describe, resolve_precision
from sphere_edit.editing.presets import preset_for
from sphere_edit.editing.requests import EditRequest
from sphere_edit.editing.sampling import generate_context_templates
from sphere_edit.editing.vstar import VStarConfig, VStarResult, compute_vstar
from sphere_edit.model.loading import load_model

REPO = Path(__file__).resolve().parents[1]
WITHIN = 0.01  # "needed": within this share of the final loss


def steps_to_within(trace: list[torch.Tensor], share: float = WITHIN) -> list[int]:
    """Per request, the first step (1-based) whose loss is at most ``(1 + share)`` times
    the last one (the last step's loss, or the one it stopped at)."""
    losses = torch.stack(trace)  # (steps, n)
    final = losses[-1]
    close = losses <= final * (1 + share)
    return [int(close[:, i].nonzero()[0]) + 1 for i in range(losses.shape[1])]


def quantile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def summary(result: VStarResult, config: VStarConfig, seconds: float) -> dict[str, float]:
    steps = [int(s) for s in result.steps]
    needed = steps_to_within(result.trace)
    return {
        "seconds": seconds,
        "mean_steps": statistics.mean(steps),
        "mean_steps_to_1pct": statistics.mean(needed),
        "median_steps_to_1pct": statistics.median(needed),
        "p90_steps_to_1pct": quantile(needed, 0.9),
        "request_steps": sum(steps),
        "mean_final_nll": float(result.nll.mean()),
        "mean_final_loss": float(result.loss.mean()),
        "converged": int((result.loss < config.loss_tolerance).sum()),
    }


def main() -> None:
    default_data = Path(os.environ.get("SPHERE_EDIT_DATA", REPO.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--data", type=Path, default=default_data)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--optimizers",
        default="adam,adam-warm,adam-adapt",
        help="comma list of name, name:steps or name:steps:lr",
    )
    parser.add_argument("--precision", default="fp32", help="auto, fp32 or bf16")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    loaded = load_model(args.model)
    preset = preset_for(loaded.name, loaded.layout.num_layers)
    precision = resolve_precision(args.precision)
    print(describe(precision, requested=args.precision), flush=True)
    records = json.loads((args.data / "counterfact" / "train.json").read_text())[: args.n]
    requests = [EditRequest.from_dict(r, index=i) for i, r in enumerate(records)]
    templates = generate_context_templates(loaded.model, loaded.tokenizer, seed=0)
    base = replace(VStarConfig(), **preset.target, bf16=precision == "bf16")
    z_layer = max(preset.layers)
    report: dict[str, dict[str, float]] = {}
    for entry in args.optimizers.split(","):
        name, steps, lr = (entry.strip().split(":") + ["", ""])[:3]
        config = replace(
            base,
            optimizer=name,
            steps=int(steps) if steps else base.steps,
            lr=float(lr) if lr else base.lr,
        )
        label = f"{name}:{config.steps}:{config.lr:g}"
        start = time.perf_counter()
        result = compute_vstar(
            loaded.model, loaded.tokenizer, loaded.layout, z_layer, requests, templates, config
        )
        report[label] = summary(result, config, time.perf_counter() - start)
        print(f"{label}: {json.dumps(report[label])}", flush=True)
    columns = next(iter(report.values())).keys()
    print(f"\n{'optimizer':<14}" + "".join(f"{c[:14]:>16}" for c in columns))
    for label, row in report.items():
        print(f"{label:<14}" + "".join(f"{row[c]:>16.4g}" for c in columns))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"n": args.n, "precision": precision, **report}, indent=2))


if __name__ == "__main__":
    main()
