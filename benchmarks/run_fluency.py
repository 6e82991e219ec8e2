"""Fluency and consistency of a benchmark run's model, measured after the run
(``sphere_edit.bench.fluency.measure_fluency``): for a run started without
``--fluency-cases``, such as the collapse study's. ``--base`` scores the unedited model (the
pre-edit row). A run still going is scored after the batches its journal holds; the
number is printed.

    python benchmarks/run_fluency.py RUN_DIR METHOD [--cases 100] [--base] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _output import print_and_save  # noqa: E402

from sphere_edit.bench.fluency import measure_fluency  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a benchmark run directory")
    parser.add_argument("method", help="one of the run's methods, e.g. ultraedit+sphere")
    parser.add_argument("--cases", type=int, default=100, help="first K of the run's cases")
    parser.add_argument("--base", action="store_true", help="score the unedited model")
    parser.add_argument("--out", type=Path, help="write the result here as JSON")
    args = parser.parse_args()
    clock = time.perf_counter()
    try:
        result = measure_fluency(args.run_dir, args.method, cases=args.cases, base=args.base)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    result = {"run_dir": str(args.run_dir), **result, "seconds": time.perf_counter() - clock}
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
