"""Peak memory of the v* loop: the process's peak resident size (``VmHWM``, Linux) after
loading the model, after building an AlphaEdit+SPHERE session (statistics loaded) and
after the target optimisation of ``--n`` requests (after the first ``--offset``) of
``--dataset`` (CounterFact train by default; any file ``sphere-edit bench`` reads, e.g.
ZsRE).

Run it once per setting (the peak of a process only grows), e.g.

    python benchmarks/vstar_memory.py --n 48 --steps 2 --requests-per-pass 16
    python benchmarks/vstar_memory.py --n 48 --steps 2 --requests-per-pass 8
    python benchmarks/vstar_memory.py --n 100 --steps 2 --positions-per-pass 192
    python benchmarks/vstar_memory.py --n 100 --offset 800 --steps 5
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/vstar_memory.py --n 48 --steps 2
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _output import DATA_HELP, data_folder  # noqa: E402

from sphere_edit.editing.build import build_session  # noqa: E402
from sphere_edit.editing.vstar import compute_vstar  # noqa: E402
from sphere_edit.evaluation.data import load_cases  # noqa: E402
from sphere_edit.model.loading import DEFAULT_MODEL, load_model  # noqa: E402


def memory_mib() -> dict[str, int]:
    """Peak and current resident size of this process, MiB."""
    fields = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS"):
                fields[name] = int(value.split()[0]) // 1024
    return {"peak": fields["VmHWM"], "resident": fields["VmRSS"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help=DATA_HELP)
    parser.add_argument(
        "--dataset", type=Path, default=None,
        help="edit cases (default: DATA/counterfact/train.json)",
    )  # fmt: skip
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument(
        "--offset", type=int, default=0,
        help="skip this many cases first (800: the requests of batch 9 in batches of 100)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--requests-per-pass", type=int, default=16)
    parser.add_argument(
        "--positions-per-pass", type=int, default=None,
        help="cap on context rows × tail positions per pass; 0: none (default: the library's)",
    )  # fmt: skip
    args = parser.parse_args()

    data = data_folder(args.data)
    print(f"{'start':<10}{memory_mib()}", flush=True)
    loaded = load_model(args.model)
    print(f"{'model':<10}{memory_mib()}", flush=True)
    dataset = args.dataset or data / "counterfact" / "train.json"
    cases = load_cases(dataset, limit=args.n, offset=args.offset)
    if len(cases) < args.n:
        raise SystemExit(
            f"{dataset} holds {len(cases)} cases after --offset {args.offset}, "
            f"fewer than --n {args.n}"
        )
    session = build_session(
        loaded, "alphaedit+sphere", corpus=str(data / "corpus" / "wiki_corpus.jsonl"),
        log=lambda _: None, progress=False,
    )  # fmt: skip
    print(f"{'session':<10}{memory_mib()}", flush=True)
    config = replace(
        session.target, steps=args.steps, loss_tolerance=0.0,
        requests_per_pass=args.requests_per_pass,
    )  # fmt: skip
    if args.positions_per_pass is not None:
        config = replace(config, positions_per_pass=args.positions_per_pass or None)
    start = time.perf_counter()
    compute_vstar(
        loaded.model, loaded.tokenizer, loaded.layout, session.layers[-1],
        [c.request for c in cases], session.context_templates(), config,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    print(f"{'v*':<10}{memory_mib()} ({seconds:.1f} s, {args.n} requests, {args.steps} steps, "
          f"offset {args.offset}, {args.requests_per_pass} per pass, "
          f"positions cap {config.positions_per_pass})")  # fmt: skip


if __name__ == "__main__":
    main()
