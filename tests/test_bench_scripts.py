"""The GPU benchmark script runs end to end without a GPU (`--cpu-smoke`), so a session lent a
GPU for a few minutes does not spend them on a broken script."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke path; a GPU runs the real benchmark")
def test_kernel_benchmark_cpu_smoke(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "bench/bench_readapt_linear.py", "--cpu-smoke", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "readapt_linear.csv").open()))
    assert {r["provider"] for r in rows} == {"fused", "cublas-base", "torch-unfused", "fused-splitk"}
    errors = [float(r["value"]) for r in rows if r["metric"] == "rel_err"]
    assert len(errors) == 2 and max(errors) <= 1e-5  # lowrank and full, fp32 through the interpreter
    assert "floor" in run.stdout and (tmp_path / "readapt_linear.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_kernel_benchmark_refuses_without_gpu(tmp_path):
    run = subprocess.run([sys.executable, "bench/bench_readapt_linear.py", "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "no CUDA GPU" in run.stderr
    assert not (tmp_path / "readapt_linear.csv").exists()
