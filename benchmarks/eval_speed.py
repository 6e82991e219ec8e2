"""Batched teacher-forced scoring against one prompt at a time, on the same prompts.

The prompts are every rewrite, paraphrase and neighbourhood prompt of the first ``--n``
CounterFact cases, each scored against its new and its true target (as the benchmark's
metrics do). Printed: seconds of each route (batched, rows that are prefixes of other rows
sharing their pass; batched, every row run; one at a time), the ratios, and the largest
difference between the batched and the one-at-a-time log-probabilities and top-1 flags
(the numbers must be the same).

    python benchmarks/eval_speed.py --n 100 --out runs/eval_speed.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _output import DATA_HELP, data_folder, print_and_save  # benchmarks/, the script's folder

from sphere_edit.evaluation.data import load_cases
from sphere_edit.evaluation.scoring import score_one_by_one, score_targets
from sphere_edit.model.loading import DEFAULT_MODEL, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=None, help=DATA_HELP)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    data = data_folder(args.data)
    loaded = load_model(args.model)
    cases = load_cases(data / "counterfact" / "train.json", limit=args.n)
    prompts, targets = [], []
    for case in cases:
        request = case.request
        for prompt in (request.text, *case.paraphrase_prompts, *case.neighborhood_prompts):
            for target in (request.target_new, request.target_true):
                prompts.append(prompt)
                targets.append(target)
    model, tok = loaded.model, loaded.tokenizer

    # The routes take turns, best of --repeats each: a load that changes during the run
    # (other jobs on the cores) then weighs on all of them alike.
    routes = {
        "batched": lambda: score_targets(model, tok, prompts, targets, batch_size=args.batch_size),
        "batched_unshared": lambda: score_targets(
            model, tok, prompts, targets, batch_size=args.batch_size, share_prefixes=False
        ),
        "one_by_one": lambda: score_one_by_one(model, tok, prompts, targets),
    }
    best = dict.fromkeys(routes, float("inf"))
    outputs = {}
    for _ in range(args.repeats):
        for name, route in routes.items():
            start = time.perf_counter()
            outputs[name] = route()
            best[name] = min(best[name], time.perf_counter() - start)
    batched, single = outputs["batched"], outputs["one_by_one"]
    batched_s, single_s = best["batched"], best["one_by_one"]

    max_diff = max(
        abs(a - b)
        for x, y in zip(batched, single, strict=True)
        for a, b in zip(x.token_logprobs, y.token_logprobs, strict=True)
    )
    top1_same = all(x.top1 == y.top1 for x, y in zip(batched, single, strict=True))
    result = {
        "model": loaded.name,
        "rows": len(prompts),
        "batch_size": args.batch_size,
        "batched_seconds": batched_s,
        "one_by_one_seconds": single_s,
        "batched_unshared_seconds": best["batched_unshared"],
        "speedup": single_s / batched_s,
        "speedup_unshared": single_s / best["batched_unshared"],
        "repeats": args.repeats,
        "max_abs_logprob_difference": max_diff,
        "top1_identical": top1_same,
    }
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
