"""How much the place of the transforms in MEMIT's schedule changes each layer's update.

On the first ``--n`` CounterFact cases, applied as one batch to SmolLM2 (the preset's
layers, options and SPHERE settings), every method runs twice from the same base weights
with the same v* (computed once; the methods share the last edited layer):
``transform_order="inside"`` (SPHERE / RECT's mask applied to each layer's ΔW before the
next layer is read, so the later layers make up for what was removed) and ``"after"``
(the dense schedule first, each layer's ΔW transformed afterwards, as the authors' MEMIT,
RECT and PRUNE code does). Printed per method and layer: ‖ΔW_after − ΔW_inside‖ /
‖ΔW_inside‖ (Frobenius, ΔW the change the batch made to the layer's weight).

PRUNE runs with ``edit_restrained=True``: editing the raw sum (its default), the live
model never carries the projection, so both orders give it the same edits.

    SPHERE_EDIT_DATA=/work/shared/data python benchmarks/schedule_order.py --n 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from sphere_edit.editing.build import MethodSpec
from sphere_edit.editing.presets import preset_for
from sphere_edit.editing.sampling import generate_context_templates
from sphere_edit.editing.session import EditSession
from sphere_edit.editing.stats import layer_second_moments, load_corpus
from sphere_edit.editing.vstar import VStarConfig, compute_vstar
from sphere_edit.evaluation.data import load_cases
from sphere_edit.methods import make_method
from sphere_edit.model.loading import load_model
from sphere_edit.sphere.projection import SphereProjection

METHODS = ("memit+sphere", "rect", "rect+sphere", "prune+sphere", "alphaedit+sphere")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=10, help="CounterFact cases in the batch")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--stats-tokens", type=int, default=None, help="default: the preset's")
    parser.add_argument("--data", default=os.environ.get("SPHERE_EDIT_DATA", "../shared/data"))
    parser.add_argument("--out", type=Path, help="also write the ratios here as JSON")
    args = parser.parse_args()

    data = Path(args.data)
    loaded = load_model(args.model)
    layout = loaded.layout
    preset = preset_for(loaded.name, layout.num_layers, loaded.model.config)
    layers = list(preset.layers)
    cases = load_cases(data / "counterfact" / "train.json", limit=args.n)
    requests = [case.request for case in cases]
    corpus = load_corpus(str(data / "corpus" / "wiki_corpus.jsonl"))
    tokens = args.stats_tokens or preset.stats_tokens
    log(f"statistics of layers {layers} over {tokens} tokens")
    stats = layer_second_moments(loaded, layers, corpus, max_tokens=tokens, progress=False)
    moments = {layer: stats[layer].moment for layer in layers}
    templates = generate_context_templates(loaded.model, loaded.tokenizer, seed=0)
    target = replace(VStarConfig(), **preset.target)
    log(f"v* of {len(requests)} requests at layer {layers[-1]}")
    vstar = compute_vstar(
        loaded.model, loaded.tokenizer, layout, layers[-1], requests, templates, target
    )
    base = {layer: layout.read_weight(layer).detach().double().clone() for layer in layers}

    ratios: dict[str, dict[int, float]] = {}
    for text in (m.strip() for m in args.methods.split(",") if m.strip()):
        spec = MethodSpec.parse(text)
        options = preset.method_options(spec.method)
        if spec.method == "prune":
            options["edit_restrained"] = True
        transform = (
            SphereProjection(eta=preset.sphere_eta(), alpha=preset.sphere_alpha(spec.method))
            if spec.sphere
            else None
        )
        changes = {}
        for order in ("inside", "after"):
            session = EditSession(
                loaded, make_method(spec.method, **options), layers, moments,
                transform=transform, target=target, templates=templates, transform_order=order,
            )  # fmt: skip
            session.apply(requests, precomputed_vstar=vstar)
            changes[order] = {
                layer: layout.read_weight(layer).detach().double() - base[layer] for layer in layers
            }
            session.rollback(1)
            for layer in layers:  # each run starts from the base weights, bitwise
                assert torch.equal(layout.read_weight(layer).detach().double(), base[layer])
        ratios[text] = {
            layer: float(
                (changes["after"][layer] - changes["inside"][layer]).norm()
                / changes["inside"][layer].norm()
            )
            for layer in layers
        }
        row = "  ".join(f"L{layer} {100 * r:6.2f}%" for layer, r in ratios[text].items())
        print(f"{text:18s} {row}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(ratios, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
