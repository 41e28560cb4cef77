"""Tile configurations for the readapt linear kernels: what the CUDA autotuner chooses from.

Kept apart from the kernels so the candidates read as a table, and so tests can run every
candidate through the Triton interpreter (a config the tuner may pick must be correct on
ragged shapes, not only fast). Plain Python: no triton import here.

Two regimes, split at DECODE_MAX_M rows of x:
* decode: the weight (N×K) is read once and dominates the bytes; tiles are thin in M and
  narrow in N so that every SM streams a weight slice. `swap_ab` variants put the weight
  on the left of the dot (the N tile becomes the tensor-core M dimension, ≥ 64 for wgmma).
* prefill: a compute-bound GEMM; the usual Hopper tiles (128×128 to 256×128, 64-wide K,
  3–4 stages). `swap_ab` makes the merged Φ + β·Δ tile the dot's left operand, which
  wgmma can read from registers, so the full-rank path skips a shared-memory round trip.
"""
from __future__ import annotations

from dataclasses import dataclass

DECODE_MAX_M = 64  # at or below: weight-bandwidth bound, one row tile per weight tile


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes of one launch of the fused GEMM; `block_r` tiles its rank loop (None: fit to
    the rank by `rank_block`, as in the autotuned tables)."""

    block_m: int
    block_n: int
    block_k: int
    block_r: int | None = None
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False


@dataclass(frozen=True)
class ShrinkConfig:
    """Tiles of the shrink t = x·down; `split_k` > 1 sums K chunks with fp32 atomics."""

    block_m: int
    block_r: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def rank_block(R: int) -> int:
    """Rank-loop tile: the widest of 64/32/16 that pads R by at most R/16 (R = 272 would run
    320 columns at 64, 288 at 32), since padded columns cost full tensor-core time."""
    for block in (64, 32):
        if -(-R // block) * block - R <= R / 16:
            return block
    return 16


def decode_block_m(M: int) -> int:
    """Smallest row tile (16, 32 or 64) holding all M ≤ DECODE_MAX_M rows, so W is read once."""
    return max(16, min(DECODE_MAX_M, 1 << max(0, M - 1).bit_length()))


def _decode_candidates() -> list[TileConfig]:
    out = []
    for bm in (16, 32, 64):
        out += [
            TileConfig(bm, 32, 128, group_m=1, num_warps=4, num_stages=4),
            TileConfig(bm, 64, 128, group_m=1, num_warps=4, num_stages=4),
            TileConfig(bm, 32, 256, group_m=1, num_warps=4, num_stages=3),
            TileConfig(bm, 64, 64, group_m=1, num_warps=4, num_stages=6),
            TileConfig(bm, 64, 128, group_m=1, num_warps=4, num_stages=4, swap_ab=True),
            TileConfig(bm, 128, 64, group_m=1, num_warps=4, num_stages=5, swap_ab=True),
            TileConfig(bm, 128, 128, group_m=1, num_warps=8, num_stages=3, swap_ab=True),
        ]
    return out


DECODE_CONFIGS = _decode_candidates()

# `python bench/compile_check.py` compiles each for sm_90 offline: none spills registers beyond
# a few bytes (128×128 with 4 warps and 64×256 did, and were dropped).
PREFILL_CONFIGS = [
    TileConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=3),
    TileConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=4),
    TileConfig(128, 256, 64, group_m=8, num_warps=8, num_stages=3),
    TileConfig(256, 128, 64, group_m=8, num_warps=8, num_stages=3),
    TileConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=3, swap_ab=True),
    TileConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=4, swap_ab=True),
    TileConfig(256, 128, 64, group_m=8, num_warps=8, num_stages=3, swap_ab=True),
    TileConfig(128, 256, 64, group_m=8, num_warps=8, num_stages=3, swap_ab=True),
]

SMEM_LIMIT = 227 * 1024  # per-block maximum on sm_90 (H100/H200); every table entry fits in bf16/fp16

# fp32 inputs run IEEE dots on the FMA units (no tensor cores): a correctness path, not a fast
# one. With Δ merged in registers, larger or pipelined fp32 tiles spill or overflow shared
# memory (`compile_check.py --dtype fp32`); this one compiles clean for both paths.
FP32_CONFIG = TileConfig(64, 64, 16, group_m=8, num_warps=4, num_stages=1)


def candidates(M: int, elem: int) -> list[TileConfig]:
    """The configs worth timing for M rows of `elem`-byte operands (never empty)."""
    if elem >= 4:
        return [FP32_CONFIG]
    if M <= DECODE_MAX_M:
        return [c for c in DECODE_CONFIGS if c.block_m == decode_block_m(M)]
    return list(PREFILL_CONFIGS)


def m_bucket(M: int) -> int:
    """Autotuning key for M (and R): a power of two, so a new prompt length rarely re-tunes."""
    return 1 << max(0, M - 1).bit_length() if M <= 8192 else 8192


def shrink_config(M: int, K: int, R: int, n_sm: int, elem: int, *, overlapped: bool = False) -> ShrinkConfig:
    """Tiles of t = x·down. It has few M×R tiles (R is small), so on its own it splits K to fill
    the SMs, summing the splits with fp32 atomics into a zero-filled t.

    `overlapped`: the GEMM is launched with programmatic dependent launch and streams its base
    loop while the shrink runs, so a decode shrink need not be fast, only done before that loop
    ends. It then skips split-K, whose zero fill is one more launch on the critical path, and
    narrows the R tiles instead: each tile reads K×block_r of `down`, no more than a GEMM tile
    reads of the weight (block_n ≥ 32).
    """
    if overlapped and M <= DECODE_MAX_M:
        block_r = next((b for b in (32, 16) if -(-R // b) >= n_sm // 4), 16)
        return ShrinkConfig(decode_block_m(M), block_r, 64 if elem >= 4 else 128, num_warps=4, num_stages=4)
    if M <= DECODE_MAX_M:
        cfg = ShrinkConfig(decode_block_m(M), 64, 64 if elem >= 4 else 128, num_warps=4, num_stages=4)
    else:
        cfg = ShrinkConfig(64, 64, 32 if elem >= 4 else 64, num_warps=4, num_stages=3)
    tiles = -(-M // cfg.block_m) * -(-R // cfg.block_r)
    k_steps = -(-K // (4 * cfg.block_k))  # keep ≥ 4 K-steps per split
    split = max(1, min(2 * n_sm // tiles, k_steps, 64))
    return ShrinkConfig(cfg.block_m, cfg.block_r, cfg.block_k, split, cfg.num_warps, cfg.num_stages)
