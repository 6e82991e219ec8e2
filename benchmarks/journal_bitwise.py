"""Content checksums of tiny-model journals, to show a refactoring leaves edits bitwise equal.

Builds a tiny random Llama (weights random, from ``tests/tiny_models.py``), saves it as a
local folder, then runs through the command line only (so the same script runs on any
commit of the package):

- ``bench``: every MEMIT-family method, with and without ``+sphere``, three batches of one
  CounterFact case from the test fixtures;
- ``edit``: MEMIT+SPHERE, three batches of one request, and a resumed copy of it; ROME and
  FT, with and without ``+sphere``, on one layer.

It prints, and writes to ``--out``, the per-batch content SHA-256 (``delta_sha256``) and
edit state (``state_after``) of every journal. Compare two commits with::

    PYTHONPATH=/path/to/old/src python benchmarks/journal_bitwise.py --out old.json
    python benchmarks/journal_bitwise.py --out new.json
    diff old.json new.json

``--transform-order inside`` runs every method with the transforms inside MEMIT's
schedule and PRUNE editing its restrained model (what the package did before either was
an option), to compare with commits from before them. ``--old-recipes`` adds the old
statistics and template recipes too (``--stats-pieces 256 --template-tokens 10``) and
``--precision fp32`` (the default, auto, picks bf16 on hardware with native bf16):
every default changed since 29a451e, set back, so any commit since then compares.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tiny_models import TRAINING_SENTENCES, make_tiny_model, make_tiny_tokenizer  # noqa: E402

METHODS = "memit,memit+sphere,alphaedit,alphaedit+sphere,rect,rect+sphere,prune,prune+sphere"
ONE_LAYER = ("rome", "rome+sphere", "ft", "ft+sphere")
# Extra options of every bench and edit command (--transform-order sets them).
FORCED: list[str] = []
# Extra options of the edit commands alone, and of the bench command alone.
EDIT_FORCED: list[str] = []
BENCH_FORCED: list[str] = []
REQUESTS = [
    {"prompt": "{} is located in", "subject": "Toronto", "target_new": "France"},
    {"prompt": "{} plays the", "subject": "John", "target_new": "guitar"},
    {"prompt": "{} is the capital of", "subject": "Berlin", "target_new": "Japan"},
]


# The bench command takes no method options: PRUNE's old semantics (editing the restrained
# model) are given by registering it with edit_restrained=True in the command's process.
OLD_PRUNE = (
    "import dataclasses, functools; from sphere_edit.methods import registry; "
    "info = registry.get_method('prune'); "
    "registry._REGISTRY['prune'] = dataclasses.replace("
    "info, factory=functools.partial(info.factory, edit_restrained=True)); "
)


def cli(*args: str) -> None:
    code = "import sys; from sphere_edit.cli.app import app; sys.exit(app())"
    if FORCED:
        args = (*args, *FORCED)
        code = (OLD_PRUNE if FORCED[-1] == "inside" else "") + code
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"sphere-edit {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")


def journal_digest(run_dir: Path) -> list[list[str]]:
    index = json.loads((run_dir / "session.json").read_text(encoding="utf-8"))
    return [[b["delta_sha256"], b["state_after"]] for b in index["batches"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file of the checksums")
    parser.add_argument(
        "--transform-order",
        choices=("inside", "after"),
        help="pass --transform-order to every command (inside: also PRUNE's old semantics)",
    )
    parser.add_argument(
        "--old-recipes",
        action="store_true",
        help="--transform-order inside, --stats-pieces 256, --template-tokens 10 and "
        "--precision fp32",
    )
    args = parser.parse_args()
    if args.old_recipes:
        args.transform_order = "inside"
        FORCED.extend(["--stats-pieces", "256", "--template-tokens", "10"])
        EDIT_FORCED.extend(["--precision", "fp32"])  # auto picks bf16 on bf16 hardware
        BENCH_FORCED.extend(["--precision", "fp32"])
    if args.transform_order:
        FORCED.extend(["--transform-order", args.transform_order])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer = make_tiny_tokenizer()
        folder = work / "tiny"
        make_tiny_model("llama", tokenizer, seed=0).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        corpus = work / "corpus.jsonl"
        lines = [json.dumps({"text": " ".join(TRAINING_SENTENCES[i:] * 3)}) for i in range(20)]
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        requests = work / "requests.jsonl"
        requests.write_text("\n".join(json.dumps(r) for r in REQUESTS) + "\n", encoding="utf-8")
        common = ["--model", str(folder), "--corpus", str(corpus), "--stats-tokens", "1000"]
        digests: dict[str, list[list[str]]] = {}

        bench = work / "bench"
        cli("bench", "--out", str(bench), "--methods", METHODS, "--n-edits", "3",
            "--batch-size", "1", "--layers", "1,2",
            "--dataset", str(ROOT / "tests/fixtures/counterfact_rome.json"), *common,
            *BENCH_FORCED)  # fmt: skip
        for folder_of_method in sorted(bench.iterdir()):
            journal = folder_of_method / "journal"
            if (journal / "session.json").exists():
                digests[f"bench/{folder_of_method.name}"] = journal_digest(journal)

        edit_args = ["--requests", str(requests), "--method", "memit+sphere", "--batch-size",
                     "1", "--layers", "1,2", "--steps", "3", *common, *EDIT_FORCED]  # fmt: skip
        cli("edit", "--out", str(work / "edit"), *edit_args)
        digests["edit/memit_sphere"] = journal_digest(work / "edit")
        cli("edit", "--out", str(work / "resumed"), *edit_args, "--resume")
        digests["edit/memit_sphere_resumed"] = journal_digest(work / "resumed")
        for spec in ONE_LAYER:
            out = work / spec.replace("+", "_")
            cli("edit", "--out", str(out), *edit_args, "--method", spec, "--layers", "2")
            digests[f"edit/{out.name}"] = journal_digest(out)
    args.out.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    for name, batches in sorted(digests.items()):
        print(f"{name:32s} " + " ".join(d[:12] for d, _ in batches))
    print(
        f"{sum(len(b) for b in digests.values())} batches in {len(digests)} journals -> {args.out}"
    )


if __name__ == "__main__":
    main()
