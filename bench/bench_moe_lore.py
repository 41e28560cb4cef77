"""LoRE of one Qwen3-30B-A3B-shaped MoE layer on the CPU: batched randomized SVD per expert
(`stream_readapt.lowrank.moe_lore`) vs a per-expert loop of `torch.linalg.svd`.

Shapes from Qwen3-30B-A3B's config: hidden 2048, moe_intermediate 768, 128 experts, so per
expert gate_up_proj [1536, 2048] and down_proj [2048, 768]. Synthetic Δ per expert with a
decaying spectrum (a different decay per expert), generated a chunk of experts at a time, so
neither provider ever holds the layer (128 × 4.7 M floats = 2.4 GB fp32). Each provider runs as
a fresh child under `/usr/bin/time -v` (bench/harness_cpu.py): wall time and peak RSS. Error
vs optimal: ours' relative error against the exact SVD's at the same rank, per expert (over
the experts the baseline ran: `--svd-experts N` limits it to the first N, its time scales linearly).

    python bench/bench_moe_lore.py --experts 128 --energy 0.5 --out bench/out
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SHAPES = {"gate_up_proj": (1536, 2048), "down_proj": (2048, 768)}


def synthetic_expert(e: int, m: int, n: int, k0: int = 384) -> torch.Tensor:
    """Δ = G1·diag(s)·G2 + a small full-rank floor; s decays at a rate that varies per expert."""
    g = torch.Generator().manual_seed(e)
    s = torch.exp(-torch.arange(k0, dtype=torch.float32) / (8 + (e % 16) * 4))
    delta = (torch.randn(m, k0, generator=g) * s) @ torch.randn(k0, n, generator=g) / math.sqrt(n)
    return delta.add_(torch.randn(m, n, generator=g), alpha=1e-3 / math.sqrt(n))


def chunks(experts: int, chunk: int, shape):
    for start in range(0, experts, chunk):
        yield torch.stack([synthetic_expert(e, *shape) for e in range(start, min(experts, start + chunk))])


def child_ours(args) -> dict:
    from stream_readapt.lowrank.moe_lore import ExpertOptions, lowrank_experts, pack_for_peft

    out = {}
    for name, shape in SHAPES.items():
        f = lowrank_experts(chunks(args.experts, args.chunk, shape), ExpertOptions(energy=args.energy))
        pack = pack_for_peft(f)
        out[name] = {"ranks": [x.rank for x in f], "errors": [x.rel_error for x in f],
                     "packed_rank": pack.rank, "padding": pack.padding}
    return out


def child_svd(args) -> dict:
    out = {}
    for name, shape in SHAPES.items():
        spectra = []
        for block in chunks(args.experts, 1, shape):  # the baseline: one full float32 SVD per expert
            spectra.append(torch.linalg.svd(block[0], full_matrices=False).S.double().tolist())
        out[name] = {"spectra": spectra}
    return out


def optimal_error(spectrum: list[float], k: int) -> float:
    s = torch.tensor(spectrum, dtype=torch.float64).square()
    return float((s[k:].sum() / s.sum()).sqrt())


def run(args) -> None:
    from harness_cpu import format_table, machine_info, run_timed, write_rows

    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for provider in ("ours", "svd"):
            result = Path(tmp) / f"{provider}.json"
            experts = args.experts if provider == "ours" else (args.svd_experts or args.experts)
            cmd = [sys.executable, __file__, "--child", provider, "--experts", str(experts),
                   "--chunk", str(args.chunk), "--energy", str(args.energy), "--result", str(result)]
            stats = run_timed(cmd, Path(tmp) / f"{provider}.log")
            results[provider] = json.loads(result.read_text())
            rows.append({"provider": provider, "experts": experts, "wall_s": round(stats["wall_s"], 2),
                         "peak_rss_mb": round(stats["peak_rss_mb"], 1), "others_cpu_s": round(stats["others_cpu_s"], 1)})
    for name in SHAPES:
        ours, svd = results["ours"][name], results["svd"][name]
        ratios = [(err + 1e-12) / (optimal_error(s, k) + 1e-12)
                  for err, k, s in zip(ours["errors"], ours["ranks"], svd["spectra"])]
        rows[0][f"{name}_rank_min_max"] = f"{min(ours['ranks'])}-{max(ours['ranks'])}"
        rows[0][f"{name}_padding"] = round(ours["padding"], 3)
        rows[0][f"{name}_err_vs_optimal_max"] = round(max(ratios), 4)
    info = machine_info()
    write_rows(rows, {"machine": info, "energy": args.energy, "shapes": SHAPES}, Path(args.out), "moe_lore")
    print(info["cpu"], f"{info['cores']} cores")
    print(format_table(rows, list(dict.fromkeys(k for r in rows for k in r))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=128, help="experts in the layer (Qwen3-30B-A3B: 128)")
    p.add_argument("--chunk", type=int, default=8, help="experts decomposed together (memory: chunk x one expert)")
    p.add_argument("--svd-experts", type=int, default=None,
                   help="run the torch.linalg.svd baseline on the first N experts only (it is slow); default all")
    p.add_argument("--energy", type=float, default=0.5, help="explained energy per expert (tau)")
    p.add_argument("--out", default=str(HERE / "out"), help="folder for moe_lore.json / .csv")
    p.add_argument("--child", choices=("ours", "svd"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        Path(args.result).write_text(json.dumps((child_ours if args.child == "ours" else child_svd)(args)))
    else:
        run(args)


if __name__ == "__main__":
    main()
