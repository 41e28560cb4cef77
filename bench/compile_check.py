"""Compile every tuned kernel config for Hopper (sm_90) on a machine with no GPU, and read the
resource report and the machine code: what a GPU session would otherwise spend minutes on.

    python bench/compile_check.py                      # all configs, bf16, table on stdout
    python bench/compile_check.py --out bench/out      # also compile_check.json

Per config and path (lowrank: x·Wᵀ + t·upᵀ with bias and DoRA scale; full: Φ + β·Δ merged in
registers; shrink: t = x·down at the decode and prefill launch configs), it reports registers
per thread, spill bytes (local memory), shared memory, and the count of tensor-core
instructions in the SASS: HGMMA (Hopper's wgmma, the fast path; "reg A" counts those reading
their left operand from registers, as the swapped full-rank path should) vs HMMA (mma.sync,
the Ampere path). Needs Triton's bundled ptxas/cuobjdump (Linux wheels).
`tests/test_kernel_compile.py` runs four representative variants of this in CI.
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
from stream_readapt.live import readapt_linear as rl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def specialize(kernel, types: dict, const: dict, unit: tuple,
               unaligned: tuple = ("beta", "M", "R", "M_BUCKET", "R_BUCKET")):
    """(signature, constexprs, attrs) of `kernel`, specialized as Triton's launcher would for
    contiguous tensors of Llama shapes: unit strides become constants, and pointers, N, K and
    other strides are known multiples of 16 (M never is: the kernels do not specialize it)."""
    names = kernel.arg_names
    const = dict(const, **dict.fromkeys(unit, 1))
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in names}
    aligned = [n for n in names if n not in const and n not in unaligned]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return sig, {(names.index(n),): v for n, v in const.items()}, attrs


def precision(dtype: str) -> str | None:
    return "ieee" if dtype == "fp32" else None  # as `_precision` picks at launch


def gemm_variant(cfg, path: str, dtype: str):
    """The fused GEMM with every term on: bias, DoRA scale, rank loop after PDL's wait."""
    types = {"X_ptr": f"*{dtype}", "W_ptr": f"*{dtype}", "D_ptr": f"*{dtype}", "T_ptr": "*fp32",
             "U_ptr": f"*{dtype}", "S_ptr": "*fp32", "Bias_ptr": f"*{dtype}", "Y_ptr": f"*{dtype}",
             "beta": "fp32"}
    const = dict(HAS_DELTA=path == "full", HAS_LOWRANK=True, HAS_ROW_SCALE=True, HAS_BIAS=True, USE_PDL=True,
                 PRECISION=precision(dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                 BLOCK_R=cfg.block_r or 64, GROUP_M=cfg.group_m, SWAP_AB=cfg.swap_ab)
    unit = ("x_col_stride", "w_col_stride", "d_col_stride", "u_col_stride")
    return rl._readapt_linear_kernel, specialize(rl._readapt_linear_kernel, types, const, unit)


def shrink_variant(cfg, dtype: str):
    """The shrink t = x·down (split-K atomics when cfg.split_k > 1), triggering PDL."""
    types = {"X_ptr": f"*{dtype}", "D_ptr": f"*{dtype}", "T_ptr": "*fp32"}
    const = dict(BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
                 USE_PDL=True, PRECISION=precision(dtype))
    unit = ("x_col_stride", "d_col_stride")
    return rl._shrink_kernel, specialize(rl._shrink_kernel, types, const, unit)


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
    """Compile one variant (path "lowrank", "full" or "shrink") for sm_90; its report as a dict."""
    kernel, (sig, const, attrs) = shrink_variant(cfg, dtype) if path == "shrink" else gemm_variant(cfg, path, dtype)
    compiled = triton.compile(ASTSource(kernel, sig, constexprs=const, attrs=attrs), target=TARGET,
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                           launch_pdl=path != "shrink"))
    ptx = compiled.asm["ptx"]
    row = {"path": path, "dtype": dtype, **cfg.__dict__, "shared_bytes": compiled.metadata.shared,
           "pdl": ("griddepcontrol.launch_dependents" if path == "shrink" else "griddepcontrol.wait") in ptx}
    row.update(inspect_cubin(compiled.asm["cubin"]))
    row["ok"] = row["local_bytes"] == 0 and row["spill_ops"] == 0 and row["shared_bytes"] <= rl.tuning.SMEM_LIMIT
    return row


def _print(row: dict, cfg) -> None:
    name = f"{cfg.block_m}x{getattr(cfg, 'block_n', cfg.block_r)}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"
    name += " swap" if getattr(cfg, "swap_ab", False) else f" split{cfg.split_k}" if row["path"] == "shrink" else ""
    print(f"{row['path']:8} {name:34} {row['regs']:4} {row['local_bytes']:5} {row['shared_bytes'] / 1024:7.1f} "
          f"{row['hgmma']:5} {row['hgmma_reg_a']:5} {row['hmma']:5}  {'ok' if row['ok'] else 'SPILLS/SMEM'}",
          flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--out", help="directory for compile_check.json")
    args = p.parse_args(argv)
    rows = []
    print(f"{'path':8} {'config':34} {'regs':>4} {'local':>5} {'smem KB':>7} {'HGMMA':>5} {'reg A':>5} {'HMMA':>5}  ok")
    elem = {"bf16": 2, "fp16": 2, "fp32": 4}[args.dtype]
    tiles = [rl.tuning.FP32_CONFIG] if elem == 4 else rl.tuning.DECODE_CONFIGS + rl.tuning.PREFILL_CONFIGS
    # The shrink's launch configs for a decode and a prefill Llama-3-8B projection (rank 272),
    # split-K on its own and unsplit under dependent launch (`overlapped`).
    shrinks = {rl.tuning.shrink_config(M, 4096, R, n_sm=132, elem=elem, overlapped=o)
               for M in (1, 16, 64, 2048) for R in (272, 1088) for o in (False, True)}
    for cfg, path in [(c, p) for c in tiles for p in ("lowrank", "full")] + [(c, "shrink") for c in shrinks]:
        row = compile_one(cfg, path, args.dtype)
        rows.append(row)
        _print(row, cfg)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "compile_check.json").write_text(json.dumps(rows, indent=1) + "\n")
    bad = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} variants compile for sm_90 without spills; "
          f"{sum(r['hgmma'] > 0 for r in rows)} use wgmma (HGMMA)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
