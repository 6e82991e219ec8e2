"""One batch of AlphaEdit+SPHERE edits on a random-weight Llama3-8B-shaped model on a GPU.

Issue 23's second measurement, ready for a lent GPU: the model is built from a config
directly on the device in bfloat16 (nothing is downloaded; **the weights are random**, so
only time and memory mean anything), C0 is collected over a short corpus of the tests'
sentences, and one batch of ``--requests`` edits goes through the library's own
session (:func:`~sphere_edit.editing.build.build_session`, ``session.apply``), as
``sphere-edit edit`` runs it. Printed: the seconds of every phase the session reports,
the peak device memory of the whole batch, and the peak of each model phase run once more
on its own (v* at the last edited layer, the keys, the evaluation of the prompts), each
after the device's peak counter is reset.

    python benchmarks/gpu_batch.py --device cuda --out runs/gpu_batch.json
    python benchmarks/gpu_batch.py --device cpu --shape tiny --requests 4   # a dry run here
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _output import print_and_save  # benchmarks/, the script's folder
from cost_model import cpu_flags, requests
from cost_model import measure as measure_on_cpu
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.tiny_models: a tokenizer that needs no download

from sphere_edit.editing.build import build_session  # noqa: E402
from sphere_edit.editing.keys import read_layer  # noqa: E402
from sphere_edit.editing.stats import Corpus  # noqa: E402
from sphere_edit.editing.vstar import VStarConfig, compute_vstar  # noqa: E402
from sphere_edit.evaluation.scoring import score_targets  # noqa: E402
from sphere_edit.model.loading import LoadedModel  # noqa: E402
from tests.tiny_models import TRAINING_SENTENCES, make_tiny_tokenizer  # noqa: E402

# hidden, intermediate, layers, heads, key/value heads, vocabulary, edited layers
SHAPES = {
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256, "4-8"),
    "tiny": (64, 128, 6, 4, 2, 1000, "2-3"),
}


def build(shape: str, tokenizer, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    hidden, intermediate, layers, heads, kv_heads, vocab, _ = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=2048, rope_theta=500000.0, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    # Built on the device in its dtype: an 8B model initialised on the CPU in float32
    # would take 32 GB and minutes.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    # The fingerprint names the random model; hashing 16 GB of weights would cost minutes.
    return LoadedModel(model, tokenizer, f"random-{shape}", _fingerprint=f"random-{shape}-seed0")


def measure(device: torch.device, fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(seconds, peak MiB, result): the device's peak allocation on a GPU (its counter
    reset first), the growth of the process's resident memory on the CPU."""
    if device.type != "cuda":
        return measure_on_cpu(fn)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, torch.cuda.max_memory_allocated(device) / 2**20, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--stats-tokens", type=int, default=20_000)
    parser.add_argument("--method", default="alphaedit+sphere")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    header: dict[str, Any] = {"shape": args.shape, "dtype": args.dtype, "device": str(device),
                              "weights": "RANDOM: costs only, no edit quality"}  # fmt: skip
    if device.type == "cuda":
        header["gpu"] = torch.cuda.get_device_name(device)
    else:
        header.update(cpu_flags())
    print(header, flush=True)

    tokenizer = make_tiny_tokenizer()
    seconds, mib, loaded = measure(device, lambda: build(args.shape, tokenizer, device, dtype))
    result: dict[str, Any] = {**header, "build_s": seconds, "build_peak_mib": mib}
    first, last = (int(x) for x in SHAPES[args.shape][6].split("-"))
    layers = list(range(first, last + 1))
    corpus = Corpus(
        texts=[f"{i} {s}" for i in range(500) for s in TRAINING_SENTENCES],
        fingerprint="gpu-batch",
        description="tests' sentences",
    )
    seconds, mib, session = measure(device, lambda: build_session(
        loaded, args.method, layers=layers, corpus=corpus, stats_tokens=args.stats_tokens,
        progress=False, log=lambda _: None, precision="bf16" if dtype == torch.bfloat16 else "fp32",
    ))  # fmt: skip
    result.update(layers=layers, statistics_s=seconds, statistics_peak_mib=mib)
    result["statistics_s_per_Mtok"] = seconds / args.stats_tokens * 1e6
    templates = session.context_templates()
    batch = requests(args.requests)

    seconds, mib, applied = measure(device, lambda: session.apply(batch))
    result.update(batch_s=seconds, batch_peak_mib=mib)
    result.update({f"batch_{phase}_s": value for phase, value in applied.timings.items()})
    result["vstar_steps_mean"] = sum(applied.target_steps) / len(applied.target_steps)

    # The model phases again on their own, for the peak memory of each.
    layout = loaded.layout
    config = VStarConfig(steps=25)
    runs = {
        "vstar": lambda: compute_vstar(
            loaded.model, tokenizer, layout, last, batch, templates, config
        ),
        "keys": lambda: read_layer(loaded.model, tokenizer, layout, first, last, batch, templates),
        "evaluation": lambda: score_targets(
            loaded.model, tokenizer, [r.text for r in batch], [r.target_new for r in batch]
        ),
    }
    for name, run in runs.items():
        seconds, mib, _ = measure(device, run)
        result[f"alone_{name}_s"], result[f"alone_{name}_peak_mib"] = seconds, mib
        print(f"{name}: {seconds:.2f} s, peak {mib:.0f} MiB", flush=True)
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
