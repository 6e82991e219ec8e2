"""Key-statistics throughput against a bare forward pass truncated at the last edited layer.

Both run over exactly the same packed batches (``stats.packed_batches``) of the same corpus
pieces; the bare pass does nothing but the truncated forward, the statistics pass also
captures the keys of every edited layer and accumulates E[k kᵀ] in float64. Printed:
tokens/s of each, their ratio, and the time 1 M tokens would take at the measured rate.

    python benchmarks/stats_speed.py --tokens 50000 [--bf16] --out runs/stats_speed.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _output import DATA_HELP, data_folder, print_and_save  # benchmarks/, the script's folder

from sphere_edit.editing.presets import preset_for
from sphere_edit.editing.stats import (
    _token_pieces,
    collect_second_moments,
    load_corpus,
    packed_batches,
)
from sphere_edit.editing.text import pad_id_of
from sphere_edit.model.hooks import capture, run_until_stopped
from sphere_edit.model.loading import DEFAULT_MODEL, load_model


@torch.no_grad()
def bare_forward(loaded, layers, pieces, tokens_per_pass: int, bf16: bool) -> float:
    stop = loaded.layout.layer(max(layers))
    start = time.perf_counter()
    for ids, mask in packed_batches(pieces, tokens_per_pass, pad_id_of(loaded.tokenizer)):
        with (
            capture(stop, stop=True),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
        ):
            run_until_stopped(
                lambda ids=ids, mask=mask: loaded.model(input_ids=ids, attention_mask=mask)
            )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=None, help=DATA_HELP)
    parser.add_argument("--tokens", type=int, default=50_000)
    parser.add_argument("--tokens-per-pass", type=int, default=4096)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    data = data_folder(args.data)
    loaded = load_model(args.model)
    layers = list(preset_for(loaded.name, loaded.layout.num_layers).layers)
    corpus = load_corpus(str(data / "corpus" / "wiki_corpus.jsonl"))
    pieces = sorted(_token_pieces(loaded.tokenizer, corpus.texts, args.tokens, 256), key=len)
    n_tokens = sum(len(p) for p in pieces)

    bare = bare_forward(loaded, layers, pieces, args.tokens_per_pass, args.bf16)
    start = time.perf_counter()
    collect_second_moments(
        loaded.model, loaded.tokenizer, layers, corpus, max_tokens=args.tokens,
        tokens_per_pass=args.tokens_per_pass, progress=False, bf16=args.bf16,
    )  # fmt: skip
    stats = time.perf_counter() - start
    result = {
        "model": loaded.name,
        "layers": layers,
        "tokens": n_tokens,
        "bf16": args.bf16,
        "threads": torch.get_num_threads(),
        "bare_tokens_per_s": n_tokens / bare,
        "stats_tokens_per_s": n_tokens / stats,
        "stats_over_bare": bare / stats,
        "minutes_per_million_tokens": 1e6 / (n_tokens / stats) / 60,
    }
    print_and_save(result, args.out, ".3f")


if __name__ == "__main__":
    main()
