"""The whole benchmark on a GPU against the same benchmark on the CPU, on a tiny model.

A tiny random Llama (the tests' tokenizer and config) edits the test fixture's three
CounterFact records, one per batch, with every method with and without SPHERE, once with
the model on the CPU and once on ``--device``; both runs go through
:class:`sphere_edit.bench.runner.Benchmark` exactly as ``sphere-edit bench`` does (v*, keys, the
closed forms, the projection, HE, checkpoints, fluency, and the general-ability tasks on
the fixture files). Printed per method: the largest relative difference between the two
devices of each batch's ΔW (from the journals) and of the final HE, and the largest
difference of any final metric. The closed forms run on the CPU in float64 either way, so
the differences come from the model's forward and backward passes (float32 on both, in
another order of summation on the GPU) and the Adam steps of v* that follow them.

    PYTHONPATH=src:. python benchmarks/device_check.py --device cuda --out runs/device_check

``--device cpu --threads 1 2`` compares two CPU runs that differ only in the order of
summation: the rounding-noise floor of each method.

Exit status 1 when a ΔW differs by more than ``--tolerance`` (relative to its largest
entry), so the script can gate a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]

from sphere_edit.bench.runner import BenchConfig, Benchmark  # noqa: E402
from sphere_edit.model.loading import load_model, resolve_device  # noqa: E402
from tests.tiny_models import make_tiny_model, make_tiny_tokenizer  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures"
# Edited layers per group of methods: FT and ROME edit exactly one.
GROUPS = {
    "multi": (("memit", "rect", "prune", "alphaedit"), (1, 2)),
    "single": (("ft", "rome"), (2,)),
}


def deltas(run_dir: Path, method: str) -> list[dict[str, torch.Tensor]]:
    folder = run_dir / method.replace("+", "_") / "journal" / "batches"
    return [load_file(path) for path in sorted(folder.glob("*.safetensors"))]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(a.abs().max())
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


def compare(cpu_dir: Path, dev_dir: Path, method: str) -> dict[str, float]:
    worst = 0.0
    for a, b in zip(deltas(cpu_dir, method), deltas(dev_dir, method), strict=True):
        for name in a:
            if name.startswith("delta."):
                worst = max(worst, relative(a[name].double(), b[name].double()))
    summaries = [
        json.loads((d / "summary.json").read_text())["methods"][method] for d in (cpu_dir, dev_dir)
    ]
    finals = [s["final"]["metrics"] for s in summaries]
    metric_gap = max(
        abs(finals[0][k] - finals[1][k])
        for k in finals[0]
        if isinstance(finals[0][k], float) and isinstance(finals[1].get(k), float)
    )
    energies = [s["energy_final"] for s in summaries]
    he_gap = max(abs(energies[0][k] - energies[1][k]) / abs(energies[0][k]) for k in energies[0])
    return {"delta_rel": worst, "metric_abs": metric_gap, "he_rel": he_gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, help="Keep both run directories here.")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument(
        "--threads", type=int, nargs=2, metavar=("FIRST", "SECOND"),
        help="CPU threads of the two runs; with --device cpu, e.g. --threads 1 2, the "
        "differences are those of rounding alone (another order of summation): the floor "
        "a GPU run is judged against",
    )  # fmt: skip
    args = parser.parse_args()
    device = resolve_device(args.device)

    work = args.out or Path(tempfile.mkdtemp(prefix="device_check."))
    folder = work / "tiny-llama"
    tokenizer = make_tiny_tokenizer()
    make_tiny_model("llama", tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    labels = ("reference_cpu", f"on_{device.type}")
    if args.threads:
        labels = (f"cpu_{args.threads[0]}_threads", f"{device.type}_{args.threads[1]}_threads")
    for group, (bases, layers) in GROUPS.items():
        config = BenchConfig(
            model=str(folder), methods=tuple(m for b in bases for m in (b, f"{b}+sphere")),
            dataset=str(FIXTURES / "counterfact_rome.json"), n_edits=3, batch_size=1,
            checkpoint_every=1, layers=layers, stats_tokens=2000, fluency_cases=2,
            general_every=3, general_data=str(FIXTURES / "general"), general_items=4,
        )  # fmt: skip
        devices = (torch.device("cpu"), device)
        for run, (label, where) in enumerate(zip(labels, devices, strict=True)):
            if args.threads:
                torch.set_num_threads(args.threads[run])
            clock = time.perf_counter()
            loaded = load_model(str(folder), device=where)
            run_dir = work / label / group
            Benchmark(config, run_dir, log=lambda _: None, progress=False, loaded=loaded).run()
            seconds = time.perf_counter() - clock
            print(f"{group} methods on {where}: {seconds:.1f}s", flush=True)

    failed = False
    print(f"{'method':<18}{'ΔW rel':>10}{'HE rel':>10}{'metric':>10}")
    for group, (bases, _) in GROUPS.items():
        for method in (m for b in bases for m in (b, f"{b}+sphere")):
            gap = compare(work / labels[0] / group, work / labels[1] / group, method)
            bad = gap["delta_rel"] > args.tolerance
            failed |= bad
            print(
                f"{method:<18}{gap['delta_rel']:>10.1e}{gap['he_rel']:>10.1e}"
                f"{gap['metric_abs']:>10.3f}{'  OVER' if bad else ''}"
            )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
