"""Compile every tuned kernel config for Hopper (sm_90) on a machine with no GPU, and read the
resource report and the machine code: what a GPU session would otherwise spend minutes on.

    python bench/compile_check.py                      # all configs, bf16, table on stdout
    python bench/compile_check.py --out bench/out      # also compile_check.json

Per config and path (lowrank: x·Wᵀ + t·upᵀ with bias and DoRA scale; full: Φ + β·Δ merged in
registers), it reports registers per thread, spill bytes (local memory), shared memory, and
the count of tensor-core instructions in the SASS: HGMMA (Hopper's wgmma, the fast path; "reg A"
counts those reading their left operand from registers, as the swapped full-rank path should) vs
HMMA (mma.sync, the Ampere path). Needs Triton's bundled ptxas/cuobjdump (Linux wheels).
`tests/test_kernel_compile.py` runs two representative variants of this in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, never interpret

import triton  # noqa: E402
from stream_readapt.kernels import readapt_linear as rl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
REG_LIMIT = 255


def signature(dtype: str, flags: dict, cfg) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of `_readapt_linear_kernel` for one variant, specialized as
    Triton's launcher would for contiguous tensors of Llama shapes: unit column strides become
    constants, and pointers, sizes and row strides are known multiples of 16."""
    kernel = rl._readapt_linear_kernel
    names = kernel.arg_names
    types = {"X_ptr": f"*{dtype}", "W_ptr": f"*{dtype}", "D_ptr": f"*{dtype}", "T_ptr": "*fp32",
             "U_ptr": f"*{dtype}", "S_ptr": "*fp32", "Bias_ptr": f"*{dtype}", "Y_ptr": f"*{dtype}",
             "beta": "fp32"}
    unit = ("x_col_stride", "w_col_stride", "d_col_stride", "u_col_stride")
    const = dict(flags, PRECISION=None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                 BLOCK_R=cfg.block_r or 64, GROUP_M=cfg.group_m, SWAP_AB=cfg.swap_ab, **dict.fromkeys(unit, 1))
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in names}
    aligned = [n for n in names if n not in const and n not in ("beta", "R", "M_BUCKET")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return sig, {(names.index(n),): v for n, v in const.items()}, attrs


def inspect_cubin(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([BIN / "cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout
        res = subprocess.run([BIN / "cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    ops = Counter(re.findall(r"\b(HGMMA|HMMA|LDL|STL)\b", sass))
    # `HGMMA.64x128x16.F32.BF16 R24, R88, gdesc[UR8], ...`: the left operand comes from registers.
    reg_a = len(re.findall(r"HGMMA\.\S+ R\d+, R\d+,", sass))
    return {"regs": int(usage.get("REG", -1)), "local_bytes": int(usage.get("LOCAL", 0)) + int(usage.get("STACK", 0)),
            "hgmma": ops["HGMMA"], "hgmma_reg_a": reg_a, "hmma": ops["HMMA"], "spill_ops": ops["LDL"] + ops["STL"]}


def compile_one(cfg, path: str, dtype: str) -> dict:
    lowrank = path == "lowrank"
    flags = dict(HAS_DELTA=not lowrank, HAS_LOWRANK=True, HAS_ROW_SCALE=True, HAS_BIAS=True, USE_PDL=True)
    sig, const, attrs = signature(dtype, flags, cfg)
    compiled = triton.compile(ASTSource(rl._readapt_linear_kernel, sig, constexprs=const, attrs=attrs), target=TARGET,
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=True))
    row = {"path": path, "dtype": dtype, **cfg.__dict__, "shared_bytes": compiled.metadata.shared,
           "pdl": "griddepcontrol.wait" in compiled.asm["ptx"]}
    row.update(inspect_cubin(compiled.asm["cubin"]))
    row["ok"] = row["local_bytes"] == 0 and row["spill_ops"] == 0 and row["shared_bytes"] <= rl.tuning.SMEM_LIMIT
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--out", help="directory for compile_check.json")
    args = p.parse_args(argv)
    rows = []
    print(f"{'path':8} {'config':34} {'regs':>4} {'local':>5} {'smem KB':>7} {'HGMMA':>5} {'reg A':>5} {'HMMA':>5}  ok")
    for cfg in rl.tuning.DECODE_CONFIGS + rl.tuning.PREFILL_CONFIGS:
        for path in ("lowrank", "full"):
            row = compile_one(cfg, path, args.dtype)
            rows.append(row)
            name = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}" + \
                   (" swap" if cfg.swap_ab else "")
            print(f"{path:8} {name:34} {row['regs']:4} {row['local_bytes']:5} {row['shared_bytes'] / 1024:7.1f} "
                  f"{row['hgmma']:5} {row['hgmma_reg_a']:5} {row['hmma']:5}  {'ok' if row['ok'] else 'SPILLS/SMEM'}",
                  flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "compile_check.json").write_text(json.dumps(rows, indent=1) + "\n")
    bad = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} variants compile for sm_90 without spills; "
          f"{sum(r['hgmma'] > 0 for r in rows)} use wgmma (HGMMA)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
