#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md in one call, on a machine with a GPU (< 10 minutes).
# Run from the repository root: results go to $OUT (if set) or ./gpu_out.
# Most informative first, so a run cut short still returns the parts that matter most.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
run() {  # run NAME SECONDS COMMAND...: output to $OUT/NAME.txt, exit status appended
    local name=$1 seconds=$2
    shift 2
    timeout "$seconds" "$@" > "$OUT/$name.txt" 2>&1
    echo "exit status $?" >> "$OUT/$name.txt"
    tail -n 25 "$OUT/$name.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
run gpu_levers 60 python3 benchmarks/gpu_levers.py --json-out "$OUT/gpu_levers.json"
run gpu_analyses 150 python3 benchmarks/bench_analyses.py --device cuda --repeats 3 \
    --json-out "$OUT/gpu_analyses.json"
run gpu_check 90 python3 benchmarks/gpu_check.py
run gpu_large_models 120 python3 benchmarks/bench_large_models.py --device cuda --repeats 3 \
    --json-out "$OUT/gpu_large_models.json"
run gpu_compare 90 python3 benchmarks/bench_compare.py --device cuda --no-memory \
    --json-out "$OUT/gpu_compare.json"
