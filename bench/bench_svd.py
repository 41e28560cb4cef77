"""Benchmark our randomized SVD against torch.linalg.svd on LLM-shaped Δ matrices.

    python bench/bench_svd.py                    # CPU: 2048×5632 and 5632×2048; + 4096×14336 on CUDA
    python bench/bench_svd.py --large            # + 8192×28672 (Llama-3-70B MLP; slow full SVD)
    python bench/bench_svd.py --quick            # one small shape, a smoke run
    python bench/bench_svd.py --reps 5 --out bench/out

Each shape gets a synthetic Δ with the spectrum of a real instruct − base delta: σ_i ∝ i^-0.5
plus a Gaussian noise floor holding NOISE_SHARE of the energy. The full SVD
(full_matrices=False) is timed once per shape, as it does not depend on k, and its σ give
the Eckart–Young optimum for every k. Ours runs at fixed k = 64, 256, 1024 and at τ = 0.5.
Rows go to `<out>/svd.{csv,json}` (harness.FIELDS: `M` holds k, `ranks` the target).
Target: at k = 256, at least 10× faster than the full SVD.
"""
from __future__ import annotations

import argparse
import os

import torch

import harness
from harness_cpu import cpu_model
from stream_readapt.lowrank.svd import randomized_svd

CPU_SHAPES = [(2048, 5632), (5632, 2048)]  # Llama-7B-class MLP projections, both ways
CUDA_SHAPES = CPU_SHAPES + [(4096, 14336)]  # + Llama-3-8B MLP
LARGE_SHAPES = [(8192, 28672)]  # Llama-3-70B MLP: its full SVD alone may take minutes
QUICK_SHAPES = [(512, 1409)]
RANKS = [64, 256, 1024]
ENERGY = 0.5
NOISE_SHARE = 0.2
TARGET_K, TARGET_SPEEDUP = 256, 10.0


def synthetic_delta(m: int, n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """U·diag(i^-0.5)·Vᵀ + noise, float32, with random orthogonal U, V."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, device=device)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g, device=device)).Q
    sigma = torch.arange(1, r + 1, device=device, dtype=torch.float32) ** -0.5
    delta = (U * sigma) @ V.mT
    del U, V
    noise = torch.randn(m, n, generator=g, device=device)
    delta += noise * (NOISE_SHARE * sigma.square().sum() / noise.square().sum()).sqrt()
    return delta


def timed(fn, reps: int) -> tuple[tuple[float, float, float], object]:
    """(p20, p50, p80) ms of fn() and the result of its last call."""
    last = {}
    times = harness.time_ms(lambda: last.__setitem__("out", fn()), cpu_reps=reps)
    return times, last["out"]


def optimal_error(sigma: torch.Tensor, k: int) -> float:
    sq = sigma.double().square()
    return float(sq[k:].sum().sqrt() / sq.sum().sqrt())


def measured_error(delta: torch.Tensor, f) -> float:
    return float((delta - (f.U * f.S) @ f.Vh).norm() / delta.norm())


def bench_shape(m: int, n: int, ranks: list[int], reps: int, device, ctx: dict) -> list[dict]:
    delta = synthetic_delta(m, n, device)
    shape = f"{m}x{n}"
    full_ms, svd = timed(lambda: torch.linalg.svd(delta, full_matrices=False), reps)
    sigma = svd.S.cpu()
    del svd
    rows = _time_rows(shape, "torch.linalg.svd", 0, "full", full_ms, ctx)
    cases = [(f"k={k}", dict(rank=k)) for k in ranks] + [(f"tau={ENERGY}", dict(energy=ENERGY))]
    for label, kwargs in cases:
        ours_ms, f = timed(lambda: randomized_svd(delta, **kwargs), reps)
        err, opt = measured_error(delta, f), optimal_error(sigma, f.rank)
        rows += _time_rows(shape, "randomized_svd", f.rank, label, ours_ms, ctx)
        for metric, value in (("rank", f.rank), ("rel_error", err), ("err_over_opt", err / opt),
                              ("speedup_vs_full", full_ms[1] / ours_ms[1])):
            rows.append(harness.make_row("svd", "randomized_svd", shape, f.rank, label, metric, value, ctx))
    return rows


def _time_rows(shape, provider, k, label, ms, ctx) -> list[dict]:
    return [harness.make_row("svd", provider, shape, k, label, f"ms_{name}", value, ctx)
            for name, value in zip(("p20", "p50", "p80"), ms)]


def summary(rows: list[dict]) -> str:
    """One line per (shape, target): time, full-SVD time, speedup, error vs the optimum."""
    get = {(r["shape"], r["provider"], r["ranks"], r["metric"]): r["value"] for r in rows}
    lines = [f"{'shape':>11} {'target':>8} {'k':>5} {'ours ms':>9} {'full ms':>9} {'speedup':>8} "
             f"{'rel err':>8} {'err/opt':>8}"]
    for shape, provider, label, metric in get:
        if provider != "randomized_svd" or metric != "rank":
            continue
        ours = lambda m: get[(shape, provider, label, m)]  # noqa: E731
        lines.append(
            f"{shape:>11} {label:>8} {ours('rank'):>5} {ours('ms_p50'):>9.1f} "
            f"{get[(shape, 'torch.linalg.svd', 'full', 'ms_p50')]:>9.1f} {ours('speedup_vs_full'):>7.1f}x "
            f"{ours('rel_error'):>8.4f} {ours('err_over_opt'):>8.4f}")
    return "\n".join(lines)


def target_line(rows: list[dict]) -> str:
    speedups = [r["value"] for r in rows
                if r["ranks"] == f"k={TARGET_K}" and r["metric"] == "speedup_vs_full"]
    if not speedups:
        return f"target (≥{TARGET_SPEEDUP:g}× at k={TARGET_K}): not measured"
    worst = min(speedups)
    verdict = "met" if worst >= TARGET_SPEEDUP else "NOT met"
    return (f"target ≥{TARGET_SPEEDUP:g}× faster than the full SVD at k={TARGET_K}: {verdict} "
            f"(worst {worst:.1f}×)")


def run_context(device: torch.device) -> dict:
    ctx = harness.run_context()
    if device.type == "cpu":  # the harness names the architecture only; the model matters here
        ctx["device"] = f"{cpu_model()} ({torch.get_num_threads()} threads)"
    return ctx


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/out", help="folder for svd.csv / svd.json (appended)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per case on the CPU")
    p.add_argument("--quick", action="store_true", help="one small shape and k=64 only: a smoke run")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run")
    p.add_argument("--large", action="store_true", help=f"also {LARGE_SHAPES} (minutes for the full SVD)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    shapes = QUICK_SHAPES if args.quick else (CUDA_SHAPES if use_cuda else CPU_SHAPES)
    shapes = shapes + (LARGE_SHAPES if args.large else [])
    ranks = [64] if args.quick else RANKS
    ctx = run_context(device)
    print(f"device: {ctx['device']}; {ctx['version']}; load average at start {os.getloadavg()[0]:.2f}")
    rows = [harness.make_row("svd", "machine", "-", 0, "-", "loadavg_1m_start", os.getloadavg()[0], ctx)]
    harness.write_rows(rows, args.out, "svd")
    for m, n in shapes:
        shape_rows = bench_shape(m, n, ranks, args.reps, device, ctx)
        harness.write_rows(shape_rows, args.out, "svd")  # shape by shape: a cut-short run keeps them
        rows += shape_rows
        print(f"done {m}x{n}", flush=True)
    end = [harness.make_row("svd", "machine", "-", 0, "-", "loadavg_1m_end", os.getloadavg()[0], ctx)]
    csv_path, _ = harness.write_rows(end, args.out, "svd")
    rows += end
    print(summary(rows))
    print(target_line(rows))
    print(f"load average at end {os.getloadavg()[0]:.2f} "
          "(timings on a shared CPU are only as quiet as it is)")
    print(f"rows appended to {csv_path}")


if __name__ == "__main__":
    main()
