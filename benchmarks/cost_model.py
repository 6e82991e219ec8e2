"""Cost model of one batch of edits on paper-scale Llama shapes, on the CPU.

For each shape a Llama model with RANDOM weights is built from a config (nothing is
downloaded), and every phase of a batch is timed with the library's own functions, with
its peak memory (the growth of this process's peak RSS while it ran, so only a phase that
sets a new peak shows a number):

- statistics (``collect_second_moments``) over a short corpus, extrapolated to 1 M tokens;
- v* (``compute_vstar``) for a few requests and steps, per request and step;
- the keys (``read_layer``), per request;
- the AlphaEdit solve (``AlphaEdit.update`` with its projector cached) and the null-space
  projector's eigendecomposition (``nullspace_projector``);
- the SPHERE projection (``SphereProjection``) and the hyperspherical energy
  (``hyperspherical_energy``) of the edited weight;
- evaluation (``score_targets``) of the requests' prompts, per request.

The linear algebra (solve, eigendecomposition, projection, HE) depends only on the
widths, so it is also timed on matrices alone along a ladder of key widths; exponents
fitted between the widths extrapolate it to Llama3-8B's key width (14,336), where only
HE and the projection are run at full size. Tokens come from the tests' small BPE
tokenizer; the embedding keeps the shape's vocabulary size, so the unembedding costs
what it would.

    python benchmarks/cost_model.py [--quick] [--out runs/cost_model.json]
    python benchmarks/cost_model.py --batch-from runs/cost_model.json  # batch costs again
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _output import machine_facts, print_and_save  # benchmarks/, the script's folder
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.tiny_models: a tokenizer that needs no download

from sphere_edit.editing.keys import read_layer  # noqa: E402
from sphere_edit.editing.requests import EditRequest  # noqa: E402
from sphere_edit.editing.stats import Corpus, collect_second_moments  # noqa: E402
from sphere_edit.editing.vstar import VStarConfig, compute_vstar  # noqa: E402
from sphere_edit.evaluation.scoring import score_targets  # noqa: E402
from sphere_edit.methods.alphaedit import AlphaEdit, nullspace_projector  # noqa: E402
from sphere_edit.methods.base import LayerState  # noqa: E402
from sphere_edit.model.arch import ModelLayout  # noqa: E402
from sphere_edit.sphere.energy import hyperspherical_energy  # noqa: E402
from sphere_edit.sphere.projection import SphereProjection  # noqa: E402
from tests.tiny_models import TRAINING_SENTENCES, make_tiny_tokenizer  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """A Llama shape; ``built_layers`` of its ``layers`` are instantiated (per-layer
    costs scale with the layer count, which the report multiplies back)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    built_layers: int


SMOLLM2 = Shape("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, 30)
LLAMA_1B = Shape("Llama-1B", 2048, 8192, 16, 32, 8, 128256, 4)
LLAMA3_8B_KEY = 14336
LLAMA3_8B_HIDDEN = 4096


def rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * PAGE / 2**20


PAGE = os.sysconf("SC_PAGE_SIZE")


def measure(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(seconds, peak resident memory above the start in MiB, result) of one call; the
    memory is sampled every few milliseconds by a thread, so short spikes may be missed."""
    before = rss_mib()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    return seconds, max(peak[0], rss_mib()) - before, result


def build(shape: Shape, tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.built_layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def requests(n: int) -> list[EditRequest]:
    subjects = ["Danielle Darrieux", "Edwin of Northumbria", "Toko Yasuda", "Autonomous Zone"]
    targets = ["English", "Islam", "piano", "Sweden"]
    return [
        EditRequest(prompt="The mother tongue of {} is", subject=subjects[i % 4],
                    target_new=targets[i % 4])
        for i in range(n)
    ]  # fmt: skip


def random_spd(d: int) -> torch.Tensor:
    """A C0-like float64 matrix: a Gram matrix of 2d random keys, scaled to E[k kᵀ]."""
    keys = torch.randn(2 * d, d)
    return (keys.T @ keys).double() / (2 * d)


def linear_algebra(d_out: int, d_key: int, n_requests: int, with_eig: bool) -> dict[str, Any]:
    """The width-only phases on random matrices of the given widths."""
    row: dict[str, Any] = {"d_out": d_out, "d_key": d_key}
    weight = torch.randn(d_out, d_key) / math.sqrt(d_key)
    if with_eig:
        c0 = random_spd(d_key)
        secs, mem, projector = measure(lambda: nullspace_projector(c0, 2e-2))
        row["eig_s"], row["eig_mib"] = secs, mem
        state = LayerState(0, "w", weight, c0, torch.zeros(d_key, d_key, dtype=torch.float64))
        state.cache["alphaedit_projector"] = (2e-2, projector)
        keys, residuals = torch.randn(n_requests, d_key), torch.randn(n_requests, d_out)
        secs, mem, delta = measure(lambda: AlphaEdit().update(keys, residuals, state))
        row["solve_s"], row["solve_mib"] = secs, mem
        del c0, projector, state
    else:
        delta = torch.randn(d_out, d_key, dtype=torch.float64)
    sphere = SphereProjection()
    secs, mem, _ = measure(lambda: sphere(delta, current=weight, pre_edit=weight))
    row["sphere_s"], row["sphere_mib"] = secs, mem
    secs, mem, _ = measure(lambda: hyperspherical_energy(weight))
    row["he_s"], row["he_mib"] = secs, mem
    return row


def model_phases(shape: Shape, tokenizer, args) -> dict[str, Any]:
    """Every phase of one batch on a random-weight model of ``shape``."""
    model = build(shape, tokenizer)
    layout = ModelLayout.of(model)
    layer = 3  # an edited layer; the phases that stop there are priced per layer of depth
    reqs = requests(args.requests)
    templates = ["{}", "The following. {}", "In short, {}"]
    row: dict[str, Any] = {"shape": shape.name, "built_layers": shape.built_layers}

    corpus = Corpus(
        texts=[f"{i} {s}" for i in range(200) for s in TRAINING_SENTENCES],
        fingerprint="cost-model",
        description="tests' sentences",
    )
    secs, mem, moments = measure(
        lambda: collect_second_moments(
            model, tokenizer, [layer], corpus, max_tokens=args.stats_tokens, progress=False
        )
    )
    tokens = moments[layer].count
    # The statistics pass and the key reads run the layers up to the last edited one:
    # per decoder layer of that depth, so any layer choice can be priced.
    row["stats_s_per_Mtok_per_depth_layer"] = secs / tokens * 1e6 / (layer + 1)
    row["stats_mib"] = mem

    config = VStarConfig(steps=args.steps, loss_tolerance=0.0)
    secs, mem, _ = measure(
        lambda: compute_vstar(model, tokenizer, layout, layer, reqs, templates, config)
    )
    depth = shape.layers / shape.built_layers  # v* runs the whole model: all its layers
    row["vstar_s_per_req_step"] = secs / (len(reqs) * args.steps) * depth
    row["vstar_mib"] = mem

    secs, mem, readout = measure(
        lambda: read_layer(model, tokenizer, layout, layer, layer, reqs, templates)
    )
    row["keys_s_per_req_per_depth_layer"] = secs / len(reqs) / (layer + 1)
    row["keys_mib"] = mem

    prompts = [r.text for r in reqs]
    secs, mem, _ = measure(
        lambda: score_targets(model, tokenizer, prompts, [r.target_new for r in reqs])
    )
    row["eval_s_per_req"] = secs / len(reqs) * depth
    row["eval_mib"] = mem
    return row


def exponent(x0: float, y0: float, x1: float, y1: float) -> float:
    """p in y ∝ x^p through two points."""
    return math.log(y1 / y0) / math.log(x1 / x0)


# One batch as the presets run it: 100 requests, at most 25 v* steps each, five edited
# layers (SmolLM2's preset window; the paper's 4-8 for the Llama shapes).
BATCH_REQUESTS, VSTAR_STEPS = 100, 25
WINDOWS = {SMOLLM2.name: range(7, 12), LLAMA_1B.name: range(4, 9), "Llama3-8B": range(4, 9)}


def batch_costs(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Seconds of every phase of one batch of 100 edits per shape, from the measured rates.

    Statistics are per 1 M corpus tokens (one pass captures every edited layer, so it runs
    to the last one); keys are read once per edited layer up to that layer; the
    eigendecomposition is once per layer and run (cached after the first batch); the
    evaluation is per 100 scored prompts. Widths not measured use the fitted exponents."""
    fits, ladder, big = result["fits"], result["ladder"], result["llama3_8b"]
    lo, hi = ladder[0], ladder[-1]

    def width_cost(key: str, d_out: int, d_key: int) -> float:
        for row in (*ladder, big):
            if row["d_key"] == d_key and key in row:
                return row[key]
        if key in ("eig_s", "solve_s"):
            return hi[key] * (d_key / hi["d_key"]) ** fits[f"{key}_exponent_in_d_key"]
        p = fits[f"{key}_exponent_in_dout_dkey"]
        return lo[key] * (d_out * d_key / (lo["d_out"] * lo["d_key"])) ** p

    costs: dict[str, dict[str, float]] = {}
    widths = {SMOLLM2.name: (SMOLLM2.hidden, SMOLLM2.intermediate),
              LLAMA_1B.name: (LLAMA_1B.hidden, LLAMA_1B.intermediate),
              "Llama3-8B": (LLAMA3_8B_HIDDEN, LLAMA3_8B_KEY)}  # fmt: skip
    phases = {row["shape"]: row for row in result["phases"]}
    for name, (d_out, d_key) in widths.items():
        window = WINDOWS[name]
        row: dict[str, float] = {}
        if name in phases:
            rates = phases[name]
            row["stats_s_per_Mtok"] = rates["stats_s_per_Mtok_per_depth_layer"] * (window[-1] + 1)
            row["vstar_s"] = rates["vstar_s_per_req_step"] * BATCH_REQUESTS * VSTAR_STEPS
            depth_layers = sum(layer + 1 for layer in window)
            row["keys_s"] = rates["keys_s_per_req_per_depth_layer"] * BATCH_REQUESTS * depth_layers
            row["eval_s_per_100_prompts"] = rates["eval_s_per_req"] * 100
        for key in ("eig_s", "solve_s", "sphere_s", "he_s"):
            row[key.replace("_s", "_s_all_layers")] = width_cost(key, d_out, d_key) * len(window)
        costs[name] = row
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--stats-tokens", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="SmolLM2 shape and ladder only")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--batch-from", type=Path, default=None, help="a saved --out: print its batch costs only"
    )
    args = parser.parse_args()
    if args.batch_from:
        saved = json.loads(args.batch_from.read_text())
        print_and_save({"header": saved["header"], "batch": batch_costs(saved)}, None)
        return
    torch.set_grad_enabled(True)
    threads = torch.get_num_threads()
    print("WEIGHTS ARE RANDOM: costs only, no edit quality is measured.")
    header = {
        "cpu": platform.processor() or platform.machine(),
        "threads": threads,
        **machine_facts(),
    }
    print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in header.items()))  # fmt: skip
    tokenizer = make_tiny_tokenizer()
    shapes = [SMOLLM2] if args.quick else [SMOLLM2, LLAMA_1B]
    phases = []
    for shape in shapes:
        row = model_phases(shape, tokenizer, args)
        row["threads"] = threads
        phases.append(row)
        print(row, flush=True)

    # Key-width ladder: eig and solve are cubic-ish, so on 2 cores they stop at 3072 and
    # are extrapolated to the 1B and 8B key widths.
    ladder = []
    for d_out, d_key in ((576, 1536), (1024, 3072)):
        row = linear_algebra(d_out, d_key, args.requests, with_eig=True)
        row["threads"] = threads
        ladder.append(row)
        print(row, flush=True)
    big = linear_algebra(LLAMA3_8B_HIDDEN, LLAMA3_8B_KEY, args.requests, with_eig=False)
    big["threads"] = threads
    print(big, flush=True)

    fits: dict[str, Any] = {}
    lo, hi = ladder[0], ladder[-1]
    for key in ("eig_s", "solve_s", "sphere_s", "he_s"):
        p = exponent(lo["d_key"], lo[key], hi["d_key"], hi[key])
        fits[f"{key}_exponent_in_d_key"] = p
        if key in ("eig_s", "solve_s"):
            for width in (LLAMA_1B.intermediate, LLAMA3_8B_KEY):
                fits[f"{key}_at_{width}_extrapolated"] = hi[key] * (width / hi["d_key"]) ** p
    for key in ("sphere_s", "he_s"):
        # Both grow with the rows (d_out) and the width: fit against d_out · d_key.
        fits[f"{key}_exponent_in_dout_dkey"] = exponent(
            lo["d_out"] * lo["d_key"], lo[key], big["d_out"] * big["d_key"], big[key]
        )
    if len(phases) == 2:
        small, large = phases
        for key in ("stats_s_per_Mtok_per_depth_layer", "vstar_s_per_req_step",
                    "keys_s_per_req_per_depth_layer", "eval_s_per_req"):  # fmt: skip
            fits[f"{key}_exponent_in_hidden"] = exponent(
                SMOLLM2.hidden, small[key], LLAMA_1B.hidden, large[key]
            )
    result = {"header": header, "phases": phases, "ladder": ladder, "llama3_8b": big, "fits": fits}
    if len(phases) == 2:
        result["batch"] = batch_costs(result)
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
