#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md in one call, for a lent GPU machine (< 10 minutes).
# Run from the repository root: results go to $OUT (the device tool's output folder) or ./gpu_out.
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
run gpu_levers 90 python3 benchmarks/gpu_levers.py --json-out "$OUT/gpu_levers.json"
run gpu_callback 180 python3 benchmarks/bench_callback.py --device cuda --gpu-suite --no-memory \
    --json-out "$OUT/gpu_callback.json"
run gpu_check 120 python3 benchmarks/gpu_check.py
run gpu_cka 180 python3 benchmarks/bench_cka.py --device cuda --gpu-suite --no-peers --max-seconds 120 \
    --json-out "$OUT/gpu_cka.json"
