"""What a v* step costs with each way of running it, paired in one run.

The first ``--n`` CounterFact train cases on SmolLM2 (preset layer and lr), ``--steps``
steps with no early stop, run ``--repeats`` times in turn under each variant, so that a
change of load hits every variant alike:

- ``fp32``: float32, the model's attention (SDPA);
- ``bf16 recast``: bfloat16 autocast with the weights recast on every call (the loop
  before ``linear_weights_as``);
- ``bf16``: autocast with the linear weights cast once (today's default under bf16;
  bitwise the same vectors as ``bf16 recast``);
- ``bf16 eager`` / ``fp32 eager``: ``VStarConfig.attention = "eager"``.

Printed: the CPU's bf16 flags, both matmul peaks, the load average, each variant's median
seconds and its speed-up over ``fp32``, and each variant's largest difference of the
vectors from ``fp32`` (and whether ``bf16`` equals ``bf16 recast`` bitwise).

    python benchmarks/vstar_step_cost.py --n 32 --steps 5 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from _output import machine_facts  # benchmarks/, the script's folder

import sphere_edit.editing.vstar as vstar
from sphere_edit.editing.presets import preset_for
from sphere_edit.editing.requests import EditRequest
from sphere_edit.editing.sampling import generate_context_templates
from sphere_edit.model.loading import load_model

REPO = Path(__file__).resolve().parents[1]
# name: (bf16, attention, cast the weights once)
VARIANTS = {
    "fp32": (False, "model", True),
    "bf16 recast": (True, "model", False),
    "bf16": (True, "model", True),
    "bf16 eager": (True, "eager", True),
    "fp32 eager": (False, "eager", True),
}


def main() -> None:
    default_data = Path(os.environ.get("SPHERE_EDIT_DATA", REPO.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", type=Path, default=default_data)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    machine = machine_facts()
    peaks = machine["matmul_peak_gflops"]
    print(
        f"threads {torch.get_num_threads()}, bf16 flags {machine['cpu_bf16_flags']} (native: "
        f"{machine['native_bf16']}), matmul peak GFLOP/s {json.dumps(peaks)}, "
        f"load {os.getloadavg()}",
        flush=True,
    )
    loaded = load_model(args.model)
    preset = preset_for(loaded.name, loaded.layout.num_layers)
    records = json.loads((args.data / "counterfact" / "train.json").read_text())[: args.n]
    requests = [EditRequest.from_dict(r, index=i) for i, r in enumerate(records)]
    templates = generate_context_templates(loaded.model, loaded.tokenizer, seed=0)
    base = replace(vstar.VStarConfig(), **preset.target, steps=args.steps, loss_tolerance=0.0)
    cast_once = vstar.linear_weights_as
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    vectors: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, (bf16, attention, cast) in VARIANTS.items():
            vstar.linear_weights_as = cast_once if cast else lambda *_: contextlib.nullcontext()
            config = replace(base, bf16=bf16, attention=attention)
            start = time.perf_counter()
            result = vstar.compute_vstar(
                loaded.model, loaded.tokenizer, loaded.layout, max(preset.layers), requests,
                templates, config,
            )  # fmt: skip
            seconds[name].append(time.perf_counter() - start)
            vectors[name] = result.vectors
            vstar.linear_weights_as = cast_once
            print(f"{name}: {seconds[name][-1]:.2f} s", flush=True)
    reference = vectors["fp32"]
    report = {
        "n": args.n, "steps": args.steps, "repeats": args.repeats,
        "bf16_flags": machine["cpu_bf16_flags"], "matmul_peak_gflops": peaks,
        "load_average_end": os.getloadavg(), "variants": {},
    }  # fmt: skip
    print(f"\n{'variant':<14}{'median s':>10}{'× fp32':>8}{'max |Δv*| vs fp32':>20}")
    for name, times in seconds.items():
        median = statistics.median(times)
        gap = float((vectors[name] - reference).abs().max())
        speedup = statistics.median(seconds["fp32"]) / median
        report["variants"][name] = {"seconds": times, "speedup": speedup, "max_diff": gap}
        print(f"{name:<14}{median:>10.2f}{speedup:>8.2f}{gap:>20.4g}")
    same = torch.equal(vectors["bf16"], vectors["bf16 recast"])
    report["bf16_cast_once_bitwise_equal"] = same
    largest = float(reference.abs().max())
    print(f"bf16 (cast once) equals bf16 recast bitwise: {same}; largest |v*| {largest:.4g}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
