"""Where a merge's CPU time goes, one row block at a time: today's op sequence vs a fused one.

Times the per-block arithmetic of `stream_readapt.engine.merge` (Ω = lerp(Φ, Θ, β) + α·s·B·A,
finite check, cast to bf16) on synthetic bf16 blocks of a few sizes, with no file I/O:
  current  the sequence merge.py / sources.py / peft_adapter.py ran at cf0edec (fresh fp32
           tensors per step, separate mul_ / add_, `isfinite(x).all()`);
  fused    in-place lerp_, one addmm_ for the LoRA term, a finite check on a sum
           (NaN/Inf propagate through it), and reused buffers: what the package does since.
The block size (fp32 MiB per operand) decides whether a block's few operands stay in cache.
Reports ns per element and the GB/s of bf16 input+output bytes it would sustain.

    python bench/profile_merge_block.py [--cols 2048] [--elems-mib 1 4 8 32] [--reps 5]
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

R, SCALE, ALPHA, BETA = 16, 2.0, 0.5, 0.5


def current(phi_bf, theta_bf, a, b) -> torch.Tensor:
    phi = phi_bf.to(torch.float32)
    lora = (b @ a).mul_(SCALE)
    out = torch.lerp(phi, theta_bf.to(torch.float32), BETA)
    out.add_(lora, alpha=ALPHA)
    if not torch.isfinite(out).all():
        raise FloatingPointError
    return out.to(torch.bfloat16)


def fused(phi_bf, theta_bf, a, b, bufs: dict) -> torch.Tensor:
    out = bufs.setdefault("out", torch.empty(phi_bf.shape))
    theta = bufs.setdefault("theta", torch.empty(phi_bf.shape))
    out.copy_(phi_bf)
    theta.copy_(theta_bf)
    out.lerp_(theta, BETA).addmm_(b, a, alpha=ALPHA * SCALE)
    if not torch.isfinite(out.sum()):
        raise FloatingPointError
    res = bufs.setdefault("res", torch.empty(phi_bf.shape, dtype=torch.bfloat16))
    return res.copy_(out)


def time_variant(fn, rows: int, cols: int, reps: int) -> float:
    """Seconds per block (median of `reps`), after one warm-up call."""
    g = torch.Generator().manual_seed(0)
    phi, theta = (torch.randn(rows, cols, generator=g).to(torch.bfloat16) for _ in range(2))
    a, b = torch.randn(R, cols, generator=g) * 0.02, torch.randn(rows, R, generator=g) * 0.02
    fn(phi, theta, a, b)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(phi, theta, a, b)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cols", type=int, default=2048)
    p.add_argument("--elems-mib", type=float, nargs="+", default=[1, 4, 8, 32], help="fp32 MiB per operand block")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cols={args.cols}")
    print("block_MiB  variant  ms/block  ns/elem  GB/s(bf16 in+out)")
    for mib in args.elems_mib:
        rows = max(1, int(mib * 2**20 / 4 / args.cols))
        variants = {"current": current, "fused": functools.partial(fused, bufs={})}
        for name, fn in variants.items():
            sec = time_variant(fn, rows, args.cols, args.reps)
            n = rows * args.cols
            print(f"{mib:9.1f}  {name:7s}  {sec * 1e3:8.2f}  {sec / n * 1e9:7.2f}  {n * 6 / sec / 1e9:8.2f}")


if __name__ == "__main__":
    main()
