#!/usr/bin/env bash
# The collapse study (issue 21): thousands of sequential edits, where methods collapse,
# with HE tracked after every batch. CounterFact train.json, batches of 100, seed 0,
# checkpoints every 500 edits, GSM8K (200 items) every 1,000 edits:
#   SmolLM2-135M: AlphaEdit, AlphaEdit+SPHERE, PRUNE, UltraEdit, UltraEdit+SPHERE and the
#   variant AlphaEdit+SPHERE-cap (issue 20) to 5,000 edits (UltraEdit: issue 24's
#   5,000-edit run, one pre-edit evaluation); MEMIT to 2,000;
#   Gemma-3-270M: AlphaEdit, AlphaEdit+SPHERE to 2,000;
#   SmolLM2-135M, the first 2,000 cases in two shuffled orders (shuffle:1, shuffle:2):
#   AlphaEdit, AlphaEdit+SPHERE, PRUNE and MEMIT (the run-to-run spread; the file-order
#   runs give the third order, the 5,000-edit ones through their checkpoint at 2,000).
# Each study is one benchmarks/parallel_bench.sh call (one process per method); the
# studies run one after the other, in the background, logging to OUT/<study>.log.
# Started again, every run resumes where it stopped (parallel_bench.sh passes --resume
# to a run that has begun); finished runs are skipped.
#
#   benchmarks/collapse_study.sh [--dry-run] [OUT]     (OUT default: runs/collapse)
#
# --dry-run prints the commands instead. SPHERE_EDIT_DATA: the data folder (default
# ../shared/data); SPHERE_EDIT picks the executable; THREADS as in parallel_bench.sh.
# Afterwards: sphere-edit report OUT/*/ --out collapse.html (run directories
# OUT/<study>_<method>, as parallel_bench.sh names them)
set -euo pipefail

dry=0
if [[ ${1:-} == --dry-run ]]; then
    dry=1
    shift
fi
out=${1:-runs/collapse}
data=${SPHERE_EDIT_DATA:-../shared/data}
here=$(cd "$(dirname "$0")" && pwd)

common=(
    --dataset "$data/counterfact/train.json" --batch-size 100 --seed 0
    --checkpoint-every 500 --corpus "$data/corpus/wiki_corpus.jsonl"
    --general-every 1000 --general-items 200 --general-tasks gsm8k
    --general-data "$data/general" --repeats edit
)

names=()
studies=()
study() {  # study NAME METHODS [bench options...]: one parallel_bench.sh call
    local name=$1 methods=$2
    shift 2
    local command=("$here/parallel_bench.sh" "$out/$name" "$methods" "${common[@]}" "$@")
    names+=("$name")
    studies+=("$(printf '%q ' "${command[@]}")")
}

study smollm2_5000 alphaedit,alphaedit+sphere,prune,ultraedit,ultraedit+sphere,alphaedit+sphere-cap --model smollm2-135m --n-edits 5000
study smollm2_2000 memit --model smollm2-135m --n-edits 2000
study gemma3_2000 alphaedit,alphaedit+sphere --model gemma3-270m --n-edits 2000
for seed in 1 2; do
    study "smollm2_2000_shuffle$seed" alphaedit,alphaedit+sphere,prune,memit \
        --model smollm2-135m --n-edits 2000 --case-order "shuffle:$seed"
done

if (( dry )); then
    printf '%s\n' "${studies[@]}"
    exit 0
fi
mkdir -p "$out"
# One study at a time: each holds a process per method, and the machine has few cores.
(
    for i in "${!studies[@]}"; do
        eval "${studies[$i]}" >> "$out/${names[$i]}.log" 2>&1 \
            || echo "study ${names[$i]} stopped; see $out/${names[$i]}.log" >&2
    done
) &
echo "collapse study: pid $! in the background; logs $out/*.log; run again to resume"
