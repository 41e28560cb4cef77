#!/usr/bin/env bash
# Everything GPU-side in one run, for a session lent a GPU machine (about 7 minutes on an H100):
#   run(command="bash bench/gpu_check.sh", timeout_s=580)
# 1. the kernel benchmark (--quick: autotunes, times fused vs cuBLAS vs unfused, checks targets),
# 2. the GPU tests (bf16 kernels, both decode shrinks, autotuner, CUDA-graph replay, patched
#    model, CUDA SVD, merge/extract/LoRE with --device cuda and their CUDA memory),
# 3. the randomized-SVD benchmark on CUDA.
# The most valuable step runs first, and each writes its files as it goes, so a timeout keeps
# what finished. Results land in $OUT (or bench/out): 8 files, the most the device tool returns.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
# Nothing can be downloaded there: fall back to the image's own setuptools if isolation fails.
pip install -q --no-deps -e . >/dev/null 2>&1 || pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
python -c "import stream_readapt.live" || { echo "gpu_check: stream_readapt did not install" | tee "$OUT/gpu.txt"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    2>&1 | tee "$OUT/gpu.txt"
TRITON_PRINT_AUTOTUNING=1 timeout 250 python bench/bench_readapt_linear.py --quick --out "$OUT" >"$OUT/bench_kernels.log" 2>&1
echo "bench_readapt_linear exit $?" >>"$OUT/bench_kernels.log"
tail -22 "$OUT/bench_kernels.log"
timeout 210 python -m pytest -q -rs -s tests/test_readapt_linear_gpu.py tests/test_patch.py tests/test_lowrank.py \
    tests/test_streaming_cuda.py -k "gpu or cuda or autotuned" >"$OUT/pytest_gpu.log" 2>&1
echo "pytest exit $?" >>"$OUT/pytest_gpu.log"
grep -E "peak CUDA memory" "$OUT/pytest_gpu.log"; tail -12 "$OUT/pytest_gpu.log"
timeout 80 python bench/bench_svd.py --device cuda --out "$OUT" >"$OUT/bench_svd.log" 2>&1
echo "bench_svd exit $?" >>"$OUT/bench_svd.log"
tail -12 "$OUT/bench_svd.log"
