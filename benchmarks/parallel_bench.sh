#!/usr/bin/env bash
# One `sphere-edit bench` process per method, side by side, for machines where one method
# cannot use every core well (small models on CPU). The first method's run evaluates the
# pre-edit model; the others start once it has and reuse its results (--pre-edit-from).
# Methods joined by ':' share one process (one after the other, sharing the first batch's
# v*), e.g. memit:memit+sphere:rect,rome:rome+sphere: two processes, for many methods on
# few cores and little memory (each process holds a model and its v* graphs).
# Every run resumes where it stopped when the script is started again with the same
# arguments, so a long study can span several sessions. Combine the runs with
#   sphere-edit report OUT_PREFIX_* --out report.html
#
#   benchmarks/parallel_bench.sh OUT_PREFIX METHODS [bench options...]
#   benchmarks/parallel_bench.sh runs/cf1000 memit,alphaedit,alphaedit+sphere \
#       --dataset ../shared/data/counterfact/train.json --n-edits 1000 --batch-size 100 \
#       --checkpoint-every 200 --corpus ../shared/data/corpus/wiki_corpus.jsonl \
#       --fluency-cases 100
#
# Threads: each process gets max(1, cores / methods) (override with THREADS=...).
# Logs: OUT_PREFIX_<method>.log. SPHERE_EDIT=... picks the executable.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
prefix=$1
IFS=',' read -r -a methods <<< "$2"
shift 2
exe=${SPHERE_EDIT:-sphere-edit}
cores=$(nproc)
threads=${THREADS:-$(( cores / ${#methods[@]} > 0 ? cores / ${#methods[@]} : 1 ))}

run_dir() { local name=${1//+/_}; echo "${prefix}_${name//:/-}"; }

start() {  # start METHOD [extra options]: a new run, or resume an interrupted one
    local method=$1 dir
    dir=$(run_dir "$method")
    shift
    local where=(--out "$dir")
    [[ -f "$dir/config.json" ]] && where=(--out "$dir" --resume)
    OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads \
        "$exe" bench "${where[@]}" --methods "${method//:/,}" "${ARGS[@]}" "$@" \
        >> "$dir.log" 2>&1 &
    echo "$method: pid $! -> $dir ($threads threads, log $dir.log)"
}

pre_edit_done() {
    grep -q '"pre_edit": true' "$(run_dir "${methods[0]}")/progress.json" 2>/dev/null
}

ARGS=("$@")
start "${methods[0]}"
first=$!
until pre_edit_done; do
    if ! kill -0 "$first" 2>/dev/null; then
        echo "${methods[0]} stopped before its pre-edit evaluation; see $(run_dir "${methods[0]}").log" >&2
        exit 1
    fi
    sleep 10
done
for method in "${methods[@]:1}"; do
    start "$method" --pre-edit-from "$(run_dir "${methods[0]}")"
done
wait
