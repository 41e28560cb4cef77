"""Benchmark the fused readapt linear kernels against cuBLAS and the unfused PyTorch sequence.

    python bench/bench_readapt_linear.py --out bench/out               # full grid, bf16, a GPU
    python bench/bench_readapt_linear.py --quick                       # a few shapes, ~2 minutes
    python bench/bench_readapt_linear.py --cpu-smoke                   # no GPU: tiny shape, interpreter

Providers per case: `fused` (ours), `cublas-base` (F.linear with the base weight alone: the
floor) and `torch-unfused` (the same math as separate PyTorch ops); decode low-rank cases add
`fused-splitk`, ours with the shrink split over K as it is launched without programmatic
dependent launch (zero fill + atomics), to show what overlapping it saves. Rows go to
`<out>/readapt_linear.{csv,json}`; a summary compares the p50 ratios with the targets.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import harness

# Llama-3-8B / -70B projections as N×K (out × in).
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 28672), (28672, 8192)]
MS = [1, 16, 64, 2048, 8192]
RANKS = [(256, 16), (256, 64), (1024, 16), (1024, 64)]  # (LoRE rank k, LoRA rank r)
QUICK = dict(shapes=[(4096, 4096), (14336, 4096)], ms=[1, 64, 2048], ranks=[(256, 16)])
SMOKE = dict(shapes=[(45, 67)], ms=[3], ranks=[(7, 3)])
DECODE_MAX_M, PREFILL_MIN_M = 64, 2048
BETA = 0.5
rl = None  # the kernel module, imported in main() once TRITON_INTERPRET is settled


@dataclass(frozen=True)
class Case:
    kernel: str  # "lowrank" or "full"
    N: int
    K: int
    M: int
    lore: int = 0
    lora: int = 0

    @property
    def R(self) -> int:
        return self.lore + self.lora

    @property
    def shape(self) -> str:
        return f"{self.N}x{self.K}"

    @property
    def ranks(self) -> str:
        return f"lore{self.lore}+lora{self.lora}" if self.R else "-"

    def flops(self) -> float:
        """Useful FLOPs of the fused formula (the same for every provider, so TFLOP/s compare)."""
        return 2.0 * self.M * (self.K * self.N + self.R * (self.K + self.N))

    def bytes(self, elem: int) -> float:
        """Minimum HBM traffic: read x, W (and Δ), down, up once; write y once."""
        weights = self.N * self.K * (2 if self.kernel == "full" else 1)
        return float(elem * (self.M * self.K + weights + self.R * (self.K + self.N) + self.M * self.N))

    def floor_vs_base(self) -> float:
        """The least fused/base time ratio physics allows: extra bytes in decode (bandwidth bound),
        extra FLOPs in prefill (compute bound). A target below it cannot be met."""
        base = Case("lowrank", self.N, self.K, self.M)
        if self.M <= DECODE_MAX_M:
            return self.bytes(2) / base.bytes(2)
        return self.flops() / base.flops()


def cases(shapes, ms, ranks) -> list[Case]:
    low = [Case("lowrank", N, K, M, k, r) for N, K in shapes for M in ms for k, r in ranks]
    return low + [Case("full", N, K, M) for N, K in shapes for M in ms]


def make_inputs(case: Case, dtype: torch.dtype, device: str) -> dict:
    """Random inputs scaled so outputs stay O(1) in bf16."""
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)

    t = {"x": randn(case.M, case.K), "w": randn(case.N, case.K, scale=case.K ** -0.5)}
    if case.kernel == "full":
        t["delta"] = randn(case.N, case.K, scale=0.1 * case.K ** -0.5)
    else:
        t["down"], t["up"] = randn(case.K, case.R, scale=case.K ** -0.5), randn(case.N, case.R, scale=0.1)
    return t


def providers(case: Case) -> list[str]:
    extra = ["fused-splitk"] if case.kernel == "lowrank" and case.R and case.M <= DECODE_MAX_M else []
    return ["fused", "cublas-base", "torch-unfused"] + extra


def _with_split_k_shrink(fn):
    """`fn` run with the shrink's split-K config even where dependent launch would overlap it."""
    pick = rl._pick_shrink

    def run():
        rl._pick_shrink = lambda M, K, R, x, overlapped: pick(M, K, R, x, False)
        try:
            return fn()
        finally:
            rl._pick_shrink = pick

    return run


def setup(provider: str, case: Case, t: dict):
    """A zero-argument callable running `provider` on `case`."""
    x, w = t["x"], t["w"]
    if provider == "cublas-base":
        return lambda: F.linear(x, w)
    if case.kernel == "full":
        if provider == "fused":
            return lambda: rl.readapt_linear_full(x, w, t["delta"], BETA)
        return lambda: torch.add(F.linear(x, w), F.linear(x, t["delta"]), alpha=BETA)
    down, up = t["down"], t["up"]
    if provider == "fused":
        return lambda: rl.readapt_linear_lowrank(x, w, down, up)
    if provider == "fused-splitk":
        return _with_split_k_shrink(lambda: rl.readapt_linear_lowrank(x, w, down, up))
    return lambda: F.linear(x, w) + (x @ down) @ up.T


def check(case: Case, t: dict) -> float:
    """Relative Frobenius error of the fused kernel against the fp32 reference."""
    if case.kernel == "full":
        got = rl.readapt_linear_full(t["x"], t["w"], t["delta"], BETA)
        want = rl.readapt_linear_full_ref(t["x"].float(), t["w"].float(), t["delta"].float(), BETA)
    else:
        got = rl.readapt_linear_lowrank(t["x"], t["w"], t["down"], t["up"])
        want = rl.readapt_linear_lowrank_ref(t["x"].float(), t["w"].float(), t["down"].float(), t["up"].float())
    return float((got.float() - want).norm() / want.norm())


def bench_case(case: Case, dtype: torch.dtype, device: str, ctx: dict, cpu_reps: int):
    """Time every provider, then check correctness; returns (rows, {provider: p50 ms}, error, tiles)."""
    t = make_inputs(case, dtype, device)
    rows, p50 = [], {}
    row = lambda prov, metric, value: harness.make_row(  # noqa: E731
        case.kernel, prov, case.shape, case.M, case.ranks, metric, value, ctx)
    for provider in providers(case):
        fn = setup(provider, case, t)
        # time_ms's untimed first call compiles, and for `fused` autotunes this shape.
        q = harness.time_ms(fn, cpu_reps=cpu_reps)
        p50[provider] = q[1]
        rows += [row(provider, f"ms_p{int(100 * p)}", v) for p, v in zip(harness.QUANTILES, q)]
        rows += [row(provider, "tflops", case.flops() / q[1] / 1e9),
                 row(provider, "tbps", case.bytes(t["x"].element_size()) / q[1] / 1e9)]
        mem = harness.peak_memory_gb(fn)
        if mem is not None:
            rows.append(row(provider, "peak_mem_gb", mem))
    err = check(case, t)
    rows.append(row("fused", "rel_err", err))
    config = tuned_config()
    rows.append(row("fused", "tile_config", config))
    return rows, p50, err, config


def tuned_config() -> str:
    """The tiles the autotuner chose for the last fused call ("-" when not autotuned)."""
    best = getattr(rl._tuned_kernel, "best_config", None)
    if best is None:
        return "-"
    k = best.kwargs
    return (f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} w{best.num_warps} s{best.num_stages}"
            + (" swap" if k["SWAP_AB"] else ""))


def verdicts(case: Case, p50: dict) -> list[tuple[str, float, float, bool]]:
    """(target, measured, bound, met) for each target that applies to this case."""
    vs_base, speedup = p50["fused"] / p50["cublas-base"], p50["torch-unfused"] / p50["fused"]
    out = []
    if case.kernel == "lowrank" and case.M <= DECODE_MAX_M:
        out += [("decode fused/base ≤", vs_base, 1.15, vs_base <= 1.15),
                ("decode unfused/fused ≥", speedup, 1.3, speedup >= 1.3)]
    if case.kernel == "lowrank" and case.M >= PREFILL_MIN_M:
        out.append(("prefill fused/base ≤", vs_base, 1.15, vs_base <= 1.15))
    if case.kernel == "full" and case.M >= PREFILL_MIN_M:
        out.append(("full prefill unfused/fused ≥", speedup, 1.6, speedup >= 1.6))
    return out


def print_summary(results: list[tuple[Case, dict, float, str]], on_gpu: bool) -> int:
    """Print one line per case and target; returns the number of missed targets."""
    missed = 0
    print(f"\n{'kernel':8} {'N×K':>12} {'M':>5} {'ranks':>16} {'fused ms':>9} {'base ms':>9} "
          f"{'unfused ms':>10} {'floor':>5}  targets")
    for case, p50, _, config in results:
        marks = []
        for name, value, bound, met in verdicts(case, p50) if on_gpu else []:
            missed += not met
            below_floor = "fused/base" in name and bound < case.floor_vs_base()
            marks.append(f"{name} {bound}: {value:.2f} "
                         + ("ok" if met else "MISSED (below the floor)" if below_floor else "MISSED"))
        if "fused-splitk" in p50:
            marks.append(f"split-K shrink {p50['fused-splitk'] / p50['fused']:.2f}x fused")
        marks.append(f"tiles {config}")
        print(f"{case.kernel:8} {case.shape:>12} {case.M:>5} {case.ranks:>16} {p50['fused']:9.3f} "
              f"{p50['cublas-base']:9.3f} {p50['torch-unfused']:10.3f} {case.floor_vs_base():5.2f}  "
              f"{'; '.join(marks) or '-'}")
    print("floor: the least fused/base ratio the extra bytes (M ≤ 64) or FLOPs (prefill) of the "
          "adapter terms allow")
    if not on_gpu:
        print("(CPU smoke run: timings and targets are meaningful on a GPU only)")
    return missed


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/out", help="directory for readapt_linear.csv/.json (git-ignored)")
    p.add_argument("--quick", action="store_true", help="2 shapes × 3 M × 1 rank pair (about 2 minutes)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="no GPU needed: one tiny shape through the Triton interpreter (or the reference)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of x and the weights (default bfloat16; the CPU smoke run uses float32)")
    p.add_argument("--strict", action="store_true", help="exit 3 when a performance target is missed")
    return p.parse_args(argv)


def load_kernels(interpret: bool):
    """Import the kernel module; TRITON_INTERPRET must be set before triton is first imported."""
    global rl
    if interpret:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from stream_readapt.live import readapt_linear

    rl = readapt_linear


def main(argv=None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.cpu_smoke
    if not on_gpu and not args.cpu_smoke:
        print("bench_readapt_linear: no CUDA GPU found; these benchmarks need one "
              "(use --cpu-smoke to check that the script runs)", file=sys.stderr)
        return 2
    load_kernels(interpret=args.cpu_smoke)
    grid = SMOKE if args.cpu_smoke else QUICK if args.quick else dict(shapes=SHAPES, ms=MS, ranks=RANKS)
    dtype = torch.float32 if args.cpu_smoke else getattr(torch, args.dtype)
    ctx, n_rows, results = harness.run_context(), 0, []
    print(f"{ctx['device']}; {ctx['version']}", flush=True)
    for case in cases(**grid):
        case_rows, p50, err, config = bench_case(case, dtype, "cuda" if on_gpu else "cpu", ctx, cpu_reps=3)
        # Rows are appended case by case, so a run cut short by a time limit keeps what it measured.
        csv_path, json_path = harness.write_rows(case_rows, args.out, "readapt_linear")
        n_rows += len(case_rows)
        results.append((case, p50, err, config))
        print(f"{case}: fused {p50['fused']:.4f} ms, base {p50['cublas-base']:.4f} ms, "
              f"unfused {p50['torch-unfused']:.4f} ms, err {err:.1e}, tiles {config}", flush=True)
    print(f"{n_rows} rows appended to {csv_path} and {json_path}")
    missed = print_summary(results, on_gpu)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    wrong = [(c, e) for c, _, e, _ in results if not e <= tol]
    for case, err in wrong:
        print(f"WRONG RESULT: {case} relative error {err:.2e} > {tol:g}", file=sys.stderr)
    return 1 if wrong else 3 if (missed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
