"""Distributed key statistics: ``sphere-edit stats`` in one process against ``torchrun`` ranks.

Both runs compute C0 of the same layers over the same corpus tokens, each into its own empty
statistics cache, with the machine's cores split evenly among the ranks (one process with
all of them against N ranks with 1/N each). Printed: the wall time of each command (model
loading included, as a user would see it), the speed-up, and per layer the largest
difference between the two cached C0 relative to the largest entry.

    python benchmarks/stats_ranks.py --corpus ../shared/data/corpus/wiki_corpus.jsonl \
        --stats-tokens 100000 --ranks 2 --out runs/stats_ranks.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _output import machine_facts, print_and_save  # benchmarks/, the script's folder
from safetensors import safe_open


def run_stats(ranks: int, threads: int, cache: Path, stats_args: list[str]) -> float:
    """Wall seconds of one ``sphere-edit stats`` command writing into ``cache``."""
    env = {**os.environ, "SPHERE_EDIT_CACHE": str(cache), "OMP_NUM_THREADS": str(threads)}
    if ranks == 1:
        command = [sys.executable, "-m", "sphere_edit", "stats", *stats_args]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={ranks}", "-m", "sphere_edit", "stats", *stats_args,
        ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    return time.perf_counter() - start


def cached_moments(cache: Path) -> dict[str, tuple[torch.Tensor, str]]:
    """Every cached C0 sum under ``cache`` and its key count, keyed by its file name (the
    layer and recipe); the partial sums of resumable runs (dot files) are left out."""
    found = {}
    for path in sorted((cache / "stats").rglob("*.safetensors")):
        if not path.name.startswith("."):
            with safe_open(str(path), framework="pt") as handle:
                found[path.name] = (handle.get_tensor("total"), handle.metadata()["count"])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default=None, help="default: the preset's")
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--stats-tokens", type=int, default=100_000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    header = {
        "cores": cores,
        **machine_facts(),
    }
    print(header, flush=True)
    stats_args = ["--model", args.model, "--corpus", args.corpus,
                  "--stats-tokens", str(args.stats_tokens)]  # fmt: skip
    if args.layers:
        stats_args += ["--layers", args.layers]

    result: dict[str, object] = dict(header)
    moments = {}
    with tempfile.TemporaryDirectory() as scratch:
        for ranks in (1, args.ranks):
            cache = Path(scratch) / f"ranks{ranks}"
            threads = max(1, cores // ranks)
            seconds = run_stats(ranks, threads, cache, stats_args)
            result[f"ranks{ranks}_threads_each"] = threads
            result[f"ranks{ranks}_s"] = seconds
            moments[ranks] = cached_moments(cache)
    single, sharded = moments[1], moments[args.ranks]
    if sorted(single) != sorted(sharded) or not single:
        single, sharded = sorted(single), sorted(sharded)
        raise SystemExit(f"error: the runs cached different C0 files: {single}, {sharded}")
    worst = 0.0
    for name, (c0, count) in single.items():
        other, other_count = sharded[name]
        if count != other_count:
            raise SystemExit(f"error: {name}: {count} keys in one process, {other_count} sharded")
        relative = float((c0 - other).abs().max() / c0.abs().max())
        result[f"rel_diff_{name}"] = relative
        worst = max(worst, relative)
    result["max_rel_diff"] = worst
    result["speedup"] = result["ranks1_s"] / result[f"ranks{args.ranks}_s"]
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
