"""Which layers to edit: MEMIT on CounterFact cases in one batch, for several windows.

For each window of consecutive layers, v* is computed once at the window's last layer;
then the first ``--n`` CounterFact cases are applied from the base weights (rolled back
after each run) with MEMIT at every ``--mom2`` weight and with AlphaEdit, and scored:
rewrite top-1 (efficacy), paraphrase top-1 (generalization), neighbourhood top-1
(specificity), and the P(new) > P(old) rates. The preset files record the chosen window
and this sweep's numbers.

    python benchmarks/layer_sweep.py --model smollm2-135m --windows 2-6,4-8,8-12,12-16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _output import DATA_HELP, data_folder  # benchmarks/, the script's folder
from counterfact_100 import evaluate, load_cases

from sphere_edit.editing.build import parse_layers
from sphere_edit.editing.sampling import generate_context_templates
from sphere_edit.editing.session import EditSession
from sphere_edit.editing.stats import layer_second_moments, load_corpus
from sphere_edit.editing.vstar import VStarConfig, compute_vstar
from sphere_edit.methods import MEMIT, AlphaEdit
from sphere_edit.model.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", required=True, help="e.g. 2-6,4-8,8-12")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--mom2", default="15000", help="MEMIT mom2 weights, e.g. 1000,15000")
    parser.add_argument("--alphaedit", action="store_true", help="also run AlphaEdit")
    parser.add_argument("--stats-tokens", type=int, default=100_000)
    parser.add_argument("--data", type=Path, default=None, help=DATA_HELP)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    data = data_folder(args.data)
    loaded = load_model(args.model)
    n_layers = loaded.layout.num_layers
    windows = [parse_layers(w, n_layers) for w in args.windows.split(",")]
    cases = load_cases(data / "counterfact" / "train.json", args.n)
    corpus = load_corpus(str(data / "corpus" / "wiki_corpus.jsonl"))
    needed = sorted({layer for w in windows for layer in w})
    moments = layer_second_moments(loaded, needed, corpus, max_tokens=args.stats_tokens)
    templates = generate_context_templates(loaded.model, loaded.tokenizer, seed=0)
    base = evaluate(loaded, cases, 64)
    print(f"base: {json.dumps(base['summary'])}", flush=True)
    results = []
    requests = [c.request for c in cases]
    config = VStarConfig(lr=args.lr)
    for window in windows:
        start = time.perf_counter()
        vstar = compute_vstar(
            loaded.model, loaded.tokenizer, loaded.layout, window[-1], requests, templates, config
        )
        vstar_s = time.perf_counter() - start
        methods = [MEMIT(mom2_weight=float(w)) for w in args.mom2.split(",")]
        if args.alphaedit:
            methods.append(AlphaEdit())
        for method in methods:
            session = EditSession(
                loaded, method, window, {layer: moments[layer].moment for layer in window},
                target=config, templates=templates,
            )  # fmt: skip
            session.apply(requests, precomputed_vstar=vstar)
            scores = evaluate(loaded, cases, 64)["summary"]
            session.rollback(1)
            row = {
                "layers": window,
                "method": method.describe(),
                "efficacy_top1": scores["rewrite_top1"],
                "efficacy_p_new_gt_old": scores["rewrite_prob_success"],
                "generalization_top1": scores["paraphrase_top1"],
                "generalization_p_new_gt_old": scores["paraphrase_prob_success"],
                "specificity_top1": scores["neighborhood_top1"],
                "specificity_base_top1": base["summary"]["neighborhood_top1"],
                "mean_v_loss": float(vstar.loss.mean()),
                "vstar_seconds": round(vstar_s, 1),
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "n": args.n, "lr": args.lr,
                                        "results": results}, indent=2))  # fmt: skip
    sys.exit(0)


if __name__ == "__main__":
    main()
