#!/usr/bin/env bash
# Everything a lent GPU machine (the device tool: minutes, once) should run, in order of
# what is cheapest and most needed, each under its own time limit so one slow step cannot
# take the others' time. Results go to ${OUT:-runs/gpu}/*.json and *.log.
#   1. device_check.py: a tiny benchmark, GPU against CPU (the pipeline works there);
#   2. gpu_batch.py: one batch of 100 AlphaEdit+SPHERE edits on a random-weight
#      Llama3-8B shape in bf16, time and peak memory per phase (issue 23, measured 2);
#   3. vstar_speed.py --device cuda: the v* fast route against the reference (issue 19,
#      goal 4), if the data folder is there.
# The machine's python must have torch with CUDA and transformers; the package runs from
# src/ (PYTHONPATH), nothing is installed.
#   OUT=$OUT bash benchmarks/gpu_session.sh
set -uo pipefail
out=${OUT:-runs/gpu}
mkdir -p "$out"
export PYTHONPATH=src:.${PYTHONPATH:+:$PYTHONPATH}
python=${PYTHON:-python}
step() {  # step NAME SECONDS COMMAND...: run with a limit, log, and go on if it fails
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "== $name: exit $? after ${SECONDS}s in all"
    tail -n 25 "$out/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$python" -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available())"
step device_check 120 "$python" benchmarks/device_check.py --device cuda --out "$out/device_check"
step gpu_batch 300 "$python" benchmarks/gpu_batch.py --device cuda --out "$out/gpu_batch.json"
if [[ -n ${SPHERE_EDIT_DATA:-} ]]; then
    step vstar_speed 150 "$python" benchmarks/vstar_speed.py --device cuda --n 100 \
        --reference-n 20 --out "$out/vstar_speed.json"
fi
