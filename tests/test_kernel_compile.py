"""The fused kernels compile for Hopper (sm_90) on this GPU-less machine: wgmma, no register
spills, programmatic dependent launch. Triton's bundled ptxas does the work; a subprocess
keeps TRITON_INTERPRET (set for the rest of the suite) out of it. bench/compile_check.py
checks every tuned config the same way.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import json, sys
sys.path.insert(0, "bench")
import compile_check as cc
from stream_readapt.live.readapt_linear_tuning import FP32_CONFIG, TileConfig, shrink_config
print(json.dumps([
    cc.compile_one(TileConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=3, swap_ab=True), "full", "bf16"),
    cc.compile_one(TileConfig(16, 64, 128, group_m=1, num_warps=4, num_stages=4, swap_ab=True), "lowrank", "bf16"),
    cc.compile_one(shrink_config(1, 4096, 272, n_sm=132, elem=2), "shrink", "bf16"),
    cc.compile_one(FP32_CONFIG, "full", "fp32"),
]))
"""


def _ptxas_bundled() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_bundled(), reason="needs triton's bundled ptxas (Linux x86-64 wheels)")
def test_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    full, decode, shrink, fp32 = json.loads(run.stdout.strip().splitlines()[-1])
    for row in (full, decode, shrink, fp32):
        assert row["ok"] and row["local_bytes"] == 0, row  # no spills, shared memory within sm_90's limit
        assert row["pdl"], row  # shrink: launch_dependents; GEMM: griddepcontrol.wait before the rank loop
    for row in (full, decode):
        assert row["hgmma"] > 0 and row["hmma"] == 0, row  # wgmma, not the Ampere mma.sync path
    assert shrink["split_k"] > 1 and fp32["hgmma"] == fp32["hmma"] == 0  # fp32 stays IEEE: no tensor cores
    # Full rank, swapped: the Φ + β·Δ tile merged in registers feeds wgmma from registers (the
    # rank loop's `up` tiles come from shared memory, as loaded).
    assert 0 < full["hgmma_reg_a"] < full["hgmma"], full
