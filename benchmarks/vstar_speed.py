"""v* optimisation speed: the fast batched path against the straightforward reference.

For the first ``--n`` CounterFact cases on SmolLM2 (preset layers), the target vectors are
computed three ways, all in this one run on this machine:

- ``reference``: one request at a time, every step running every prompt in full;
- ``fast fp32``: all requests batched, prefix KV cache, layers below the injection layer run
  once, unembedding only where the loss reads it, converged requests dropped;
- ``fast bf16``: the same under bfloat16 autocast (the solve stays float64).

Each set of targets is then applied with MEMIT (preset options) to the same base weights
and efficacy is measured, so "same results" is checked on the edits, not only on the
vectors. The achieved matmul throughput of the fast loop is reported against a measured
fp32 / bf16 matmul peak of this machine (FLOPs counted by ``torch.utils.flop_counter``).

    python benchmarks/vstar_speed.py --n 100 --reference-n 20 --out runs/vstar_speed.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _output import DATA_HELP, data_folder, machine_facts  # noqa: E402
from counterfact_100 import evaluate, load_cases, log  # noqa: E402

from sphere_edit.editing.build import build_session  # noqa: E402
from sphere_edit.editing.vstar import VStarResult, compute_vstar  # noqa: E402
from sphere_edit.model.loading import DEFAULT_MODEL, load_model, resolve_device  # noqa: E402


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cat_results(parts: list[VStarResult]) -> VStarResult:
    return VStarResult(
        vectors=torch.cat([p.vectors for p in parts]),
        init=torch.cat([p.init for p in parts]),
        loss=torch.cat([p.loss for p in parts]),
        nll=torch.cat([p.nll for p in parts]),
        steps=torch.cat([p.steps for p in parts]),
    )


def step_flops(model, tok, layout, z_layer, groups, templates, config) -> list[int]:
    """FLOPs of the fast route over ``groups`` (one call each) with 1 step (a final forward
    only) and with 2 (one forward+backward step before it): their difference is a step."""
    counts = []
    for steps in (1, 2):
        with FlopCounterMode(display=False) as counter:
            sample = replace(config, steps=steps, loss_tolerance=0.0)
            for group in groups:
                compute_vstar(model, tok, layout, z_layer, group, templates, sample)
        counts.append(counter.get_total_flops())
    return counts


def flops_per_request_step(model, tok, layout, z_layer, requests, templates, config) -> dict:
    """GFLOP per request and step of the fast route: the whole batch as it is grouped, the
    same requests in input-order passes, and the first pass's requests alone."""

    def per_step(groups: list[list]) -> float:
        counts = step_flops(model, tok, layout, z_layer, groups, templates, config)
        return (counts[1] - counts[0]) / sum(len(g) for g in groups) / 1e9

    per = config.requests_per_pass
    chunks = [requests[b : b + per] for b in range(0, len(requests), per)]
    return {
        "requests": len(requests),
        "gflop_per_request_step": per_step([requests]),
        "gflop_per_request_step_input_order_passes": per_step(chunks),
        "gflop_per_request_step_first_pass_alone": per_step(chunks[:1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help=DATA_HELP)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument(
        "--reference-n", type=int, default=20,
        help="requests for the (slow) reference; its time is scaled to --n",
    )  # fmt: skip
    parser.add_argument("--stats-tokens", type=int, default=100_000)
    parser.add_argument("--skip-bf16", action="store_true")
    parser.add_argument(
        "--flops-only", action="store_true",
        help="print the FLOPs per request-step of the fast route and stop (exact, "
        "unaffected by other load on the machine)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    data = data_folder(args.data)
    device = resolve_device(args.device)
    loaded = load_model(args.model, device=device)
    cases = load_cases(data / "counterfact" / "train.json", args.n)
    requests = [c.request for c in cases]
    session = build_session(
        loaded, "memit", corpus=str(data / "corpus" / "wiki_corpus.jsonl"),
        stats_tokens=args.stats_tokens, log=log,
    )  # fmt: skip
    model, tok, layout = loaded.model, loaded.tokenizer, loaded.layout
    templates = session.context_templates()
    z_layer = session.layers[-1]
    config = session.target
    machine = machine_facts(device)
    peaks = machine["matmul_peak_gflops"]
    log(f"bf16 flags {machine['cpu_bf16_flags']} (native: {machine['native_bf16']})")
    log(f"matmul peak GFLOP/s: {peaks}")

    runs: dict[str, dict] = {}
    if args.flops_only:
        print(json.dumps(flops_per_request_step(model, tok, layout, z_layer, requests,
                                                templates, config), indent=2))  # fmt: skip
        return

    def fast(name: str, bf16: bool) -> VStarResult:
        cfg = replace(config, bf16=bf16)
        counts = step_flops(model, tok, layout, z_layer, [requests], templates, cfg)
        # The whole batch, as the run groups it: the passes, their padding and the
        # once-per-batch prefix work all count.
        per_request_step = (counts[1] - counts[0]) / len(requests)
        synchronize(device)
        start = time.perf_counter()
        result = compute_vstar(model, tok, layout, z_layer, requests, templates, cfg)
        synchronize(device)
        seconds = time.perf_counter() - start
        steps = int(result.steps.sum())
        flops = counts[0] + per_request_step * max(0, steps - len(requests))
        runs[name] = {
            "seconds": seconds,
            "request_steps": steps,
            "gflop": flops / 1e9,
            "gflop_per_request_step": per_request_step / 1e9,
            "gflop_once_per_batch": (2 * counts[0] - counts[1]) / 1e9,
            "gflop_per_s": flops / seconds / 1e9,
            "share_of_peak": flops / seconds / 1e9 / peaks["bf16" if bf16 else "fp32"],
            "mean_loss": float(result.loss.mean()),
        }
        log(f"{name}: {runs[name]}")
        return result

    results = {"fast fp32": fast("fast fp32", False)}
    if not args.skip_bf16:
        results["fast bf16"] = fast("fast bf16", True)

    if args.reference_n > 0:  # 0: the fast routes only (e.g. to count their FLOPs)
        reference_config = replace(config, route="reference", requests_per_pass=1)
        synchronize(device)
        start = time.perf_counter()
        parts = [
            compute_vstar(model, tok, layout, z_layer, [r], templates, reference_config)
            for r in requests[: args.reference_n]
        ]
        synchronize(device)
        seconds = time.perf_counter() - start
        runs["reference"] = {
            "seconds_measured": seconds,
            "requests_measured": args.reference_n,
            "seconds": seconds * args.n / args.reference_n,
            "mean_loss": float(torch.cat([p.loss for p in parts]).mean()),
        }
        log(f"reference: {runs['reference']}")
        reference = cat_results(parts)
        # Targets come back in request order whatever the grouping of the fast route.
        runs["reference"]["max_abs_diff_vs_fast_fp32"] = float(
            (reference.vectors - results["fast fp32"].vectors[: args.reference_n]).abs().max()
        )

    # Efficacy of the edits each set of targets gives (MEMIT, same base weights): each
    # batch is rolled back before the next, so every route edits the unedited model.
    scored = {name: (requests, cases, result) for name, result in results.items()}
    if "reference" in runs:
        n_ref = args.reference_n
        scored["reference"] = (requests[:n_ref], cases[:n_ref], reference)
    for name, (edited, edited_cases, result) in scored.items():
        session.apply(edited, precomputed_vstar=result)
        summary = evaluate(loaded, edited_cases, 64)["summary"]
        runs[name]["efficacy"] = {
            "p_new_gt_old": summary["rewrite_prob_success"],
            "top1": summary["rewrite_top1"],
        }
        session.rollback(1)
    if "reference" in runs:
        for name in results:
            runs[name]["speedup_vs_reference"] = (
                runs["reference"]["seconds"] / runs[name]["seconds"]
            )

    print(f"{'route':<12}{'seconds':>10}{'× ref':>8}{'GFLOP/s':>10}{'% peak':>8}{'eff P>':>8}")
    for name, row in runs.items():
        eff = row.get("efficacy", {}).get("p_new_gt_old")
        print(
            f"{name:<12}{row['seconds']:>10.1f}{row.get('speedup_vs_reference', 1.0):>8.1f}"
            f"{row.get('gflop_per_s', float('nan')):>10.1f}"
            f"{100 * row.get('share_of_peak', float('nan')):>8.1f}"
            f"{'' if eff is None else f'{eff:.2f}':>8}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {"machine": machine, "peaks": peaks, "runs": runs, "n": args.n}
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
