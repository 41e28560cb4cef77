#!/usr/bin/env bash
# Everything GPU-side in one run (for a session lent a GPU machine; ~8 minutes on an H100):
#   run(command="bash bench/gpu_check.sh", timeout_s=540)
# GPU tests (bf16 kernels, CUDA randomized SVD), then the kernel and SVD benchmarks.
# Results land in $OUT (or bench/out): pytest log, readapt_linear.csv/json, svd.csv/json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
pip install -q --no-deps -e . >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 180 python -m pytest -q -x tests/test_readapt_linear_gpu.py tests/test_readapt_linear.py \
    tests/test_lowrank.py -k "cuda or gpu or Gpu or GPU or readapt_linear" 2>&1 | tail -25 | tee "$OUT/pytest_gpu.log"
timeout 240 python bench/bench_readapt_linear.py --quick --out "$OUT" 2>&1 | tail -40 | tee "$OUT/bench_kernels.log"
timeout 120 python bench/bench_svd.py --device cuda --out "$OUT" 2>&1 | tail -20 | tee "$OUT/bench_svd.log"
