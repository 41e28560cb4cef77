"""Fused merged-linear forward for readaptation: y = x·Ωᵀ without materializing Ω.

Ω = Φ + α·Ψ + β·Δ (RE-Adapt, Fleshman & Van Durme 2024, arXiv 2405.15007). Two paths:

* low rank: Δ ≈ U·diag(σ)·Vᵀ and a LoRA Ψ = s·B·A fold into one skinny pair
  (`fold_lowrank`), so y = (x·Φᵀ)⊙row_scale + (x·down)·upᵀ + bias: a "shrink" GEMM
  t = x·down, then the base GEMM with a second loop over the rank in its epilogue
  (the shrink/expand split follows Punica, Chen et al. 2023, arXiv 2310.18547);
* full rank: y = x·(row_scale⊙Φ + β·Δ)ᵀ + (x·down)·upᵀ + bias, with Φ and Δ tiles
  combined in registers before each dot.

On CUDA the GEMM's tiles are autotuned per (M bucket, N, K, R bucket) among the candidates in
`readapt_linear_tuning` (decode and prefill tables; `swap_ab` variants compute the transposed
product so the weight tile is wgmma's register operand). On Hopper the GEMM is launched with
programmatic dependent launch: it starts while the shrink still runs, and waits for t only
before its rank loop.

Top to bottom: Triton kernels, launchers, plain-PyTorch references (the CPU path).
"""
from __future__ import annotations

import functools
import logging
import os
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: kernels below are defined but never launched
    triton = None
    tl = SimpleNamespace(constexpr=None)

jit = triton.jit if triton is not None else (lambda fn: fn)


def _jit_unspecialized(*names):
    """triton.jit that does not specialize these integer arguments. By default Triton compiles
    anew for M == 1, M % 16 == 0 and the rest; row masks make M's alignment worthless, and a
    serving process would pay each compile (and autotuning) again."""
    return triton.jit(do_not_specialize=list(names)) if triton is not None else (lambda fn: fn)

try:  # programmatic dependent launch (Hopper+), in Triton since 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except ImportError:
    gdc_launch_dependents = gdc_wait = None
    HAS_GDC = False

from . import readapt_linear_tuning as tuning  # noqa: E402
from .readapt_linear_tuning import ShrinkConfig, TileConfig  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = [
    "fold_lowrank",
    "readapt_linear_lowrank",
    "readapt_linear_full",
    "readapt_linear_lowrank_ref",
    "readapt_linear_full_ref",
]


# ----------------------------------------------------------------------------- kernels


@jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row tiles share each weight tile while it is in L2.
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    return pid_m, pid_n


@jit
def _along_n(v, SWAP_AB: tl.constexpr):
    """Broadcast a per-output-channel [BLOCK_N] vector over an accumulator tile."""
    if SWAP_AB:
        return v[:, None]  # acc is [BLOCK_N, BLOCK_M]
    else:
        return v[None, :]  # acc is [BLOCK_M, BLOCK_N]


@jit
def _nk_offsets(offs_n, ks, row_stride, col_stride, SWAP_AB: tl.constexpr):
    """Offsets of an [N, K]-stored tile, laid out [BLOCK_N, BLOCK_K] (swapped) or [BLOCK_K, BLOCK_N]."""
    if SWAP_AB:
        return offs_n[:, None] * row_stride + ks[None, :] * col_stride
    else:
        return ks[:, None] * col_stride + offs_n[None, :] * row_stride


@jit
def _mk_offsets(offs_m, ks, row_stride, col_stride, SWAP_AB: tl.constexpr):
    """Offsets of an [M, K]-stored tile, laid out [BLOCK_K, BLOCK_M] (swapped) or [BLOCK_M, BLOCK_K]."""
    if SWAP_AB:
        return ks[:, None] * col_stride + offs_m[None, :] * row_stride
    else:
        return offs_m[:, None] * row_stride + ks[None, :] * col_stride


@jit
def _base_loop(acc, X_ptr, x_row_stride, x_col_stride, W_ptr, w_row_stride, w_col_stride,
               D_ptr, d_row_stride, d_col_stride, beta, scale, offs_m, offs_n, M, N, K,
               HAS_DELTA: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, SWAP_AB: tl.constexpr,
               BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc += x·Wᵀ, or x·(scale⊙W + β·Δ)ᵀ with each W/Δ tile merged in fp32 registers.

    SWAP_AB computes the transposed product (acc is [BLOCK_N, BLOCK_M]): the weight tile is
    the dot's left operand, which Hopper's wgmma reads straight from registers.
    """
    offs_k = tl.arange(0, BLOCK_K)
    for k in range(0, K, BLOCK_K):
        ks = k + offs_k
        # One K mask shared by the x, W and Δ loads, written out per orientation: folding
        # these loads into per-tile helpers (each with its own mask) raised register use and
        # made 7 of 61 variants spill (bench/compile_check.py).
        in_k = ks < K
        if SWAP_AB:
            x_mask = in_k[:, None] & (offs_m[None, :] < M)
            w_mask = (offs_n[:, None] < N) & in_k[None, :]
        else:
            x_mask = (offs_m[:, None] < M) & in_k[None, :]
            w_mask = in_k[:, None] & (offs_n[None, :] < N)
        x = tl.load(X_ptr + _mk_offsets(offs_m, ks, x_row_stride, x_col_stride, SWAP_AB), mask=x_mask, other=0.0)
        w = tl.load(W_ptr + _nk_offsets(offs_n, ks, w_row_stride, w_col_stride, SWAP_AB), mask=w_mask, other=0.0)
        if HAS_DELTA:
            d = tl.load(D_ptr + _nk_offsets(offs_n, ks, d_row_stride, d_col_stride, SWAP_AB), mask=w_mask, other=0.0)
            wf = w.to(tl.float32)
            if HAS_ROW_SCALE:
                wf = wf * _along_n(scale, SWAP_AB)
            # Rounded once to the operand dtype, exactly as a materialized merged weight would be.
            w = (wf + beta * d.to(tl.float32)).to(x.dtype)
        if SWAP_AB:
            acc = tl.dot(w, x, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
    return acc


@jit
def _rank_loop(acc, T_ptr, t_row_stride, U_ptr, u_row_stride, u_col_stride, offs_m, offs_n, M, N, R,
               SWAP_AB: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """acc += t·upᵀ (t = x·down, fp32 [M, R]); t is rounded to up's dtype right before the dot,
    so the rank loop runs on the same tensor-core path as the base loop."""
    offs_r = tl.arange(0, BLOCK_R)
    for r in range(0, R, BLOCK_R):
        rs = r + offs_r
        in_r = rs < R
        if SWAP_AB:
            t = tl.load(T_ptr + _mk_offsets(offs_m, rs, t_row_stride, 1, True),
                        mask=in_r[:, None] & (offs_m[None, :] < M), other=0.0)
            u = tl.load(U_ptr + _nk_offsets(offs_n, rs, u_row_stride, u_col_stride, True),
                        mask=(offs_n[:, None] < N) & in_r[None, :], other=0.0)
            acc = tl.dot(u, t.to(u.dtype), acc, input_precision=PRECISION)
        else:
            t = tl.load(T_ptr + _mk_offsets(offs_m, rs, t_row_stride, 1, False),
                        mask=(offs_m[:, None] < M) & in_r[None, :], other=0.0)
            u = tl.load(U_ptr + _nk_offsets(offs_n, rs, u_row_stride, u_col_stride, False),
                        mask=in_r[:, None] & (offs_n[None, :] < N), other=0.0)
            acc = tl.dot(t.to(u.dtype), u, acc, input_precision=PRECISION)
    return acc


@_jit_unspecialized("M")
def _shrink_kernel(X_ptr, D_ptr, T_ptr, M, K, R,
                   x_row_stride, x_col_stride, d_row_stride, d_col_stride, t_row_stride,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT_K: tl.constexpr, USE_PDL: tl.constexpr, PRECISION: tl.constexpr):
    """t = x·down. x: [M, K], down: [K, R], t: [M, R] fp32 (zero-filled when SPLIT_K > 1)."""
    if USE_PDL:
        # Let the main GEMM launch now: its base loop (most of its work) needs no t.
        gdc_launch_dependents()
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    n_r = tl.cdiv(R, BLOCK_R)
    offs_m = (pid // n_r) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = (pid % n_r) * BLOCK_R + tl.arange(0, BLOCK_R)
    # Split K so that skinny decode shapes (few M×R tiles) still fill every SM.
    chunk = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * chunk
    k_hi = min(k_lo + chunk, K)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        ks = k + offs_k
        x = tl.load(X_ptr + offs_m[:, None] * x_row_stride + ks[None, :] * x_col_stride,
                    mask=(offs_m[:, None] < M) & (ks[None, :] < k_hi), other=0.0)
        d = tl.load(D_ptr + ks[:, None] * d_row_stride + offs_r[None, :] * d_col_stride,
                    mask=(ks[:, None] < k_hi) & (offs_r[None, :] < R), other=0.0)
        acc = tl.dot(x, d, acc, input_precision=PRECISION)
    ptrs = T_ptr + offs_m[:, None] * t_row_stride + offs_r[None, :]
    mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
    if SPLIT_K == 1:
        tl.store(ptrs, acc, mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)


@_jit_unspecialized("M", "M_BUCKET", "R_BUCKET")
def _readapt_linear_kernel(
    X_ptr, W_ptr, D_ptr, T_ptr, U_ptr, S_ptr, Bias_ptr, Y_ptr,
    M, N, K, R, beta, M_BUCKET, R_BUCKET,
    x_row_stride, x_col_stride, w_row_stride, w_col_stride, d_row_stride, d_col_stride,
    t_row_stride, u_row_stride, u_col_stride, y_row_stride,
    HAS_DELTA: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_PDL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr,
):
    """y = x·(s⊙W + β·Δ)ᵀ + t·upᵀ + bias, or (x·Wᵀ)⊙s + t·upᵀ + bias without Δ.

    x: [M, K], w/Δ: [N, K], t = x·down: [M, R] fp32, up: [N, R], s (row_scale), bias: [N].
    Every term accumulates into one fp32 tile; y is written once, in x's dtype. M_BUCKET and
    R_BUCKET are only the autotuner's key (M and R rounded up to powers of two).
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    scale = tl.zeros((BLOCK_N,), dtype=tl.float32) + 1.0
    if HAS_ROW_SCALE:
        scale = tl.load(S_ptr + offs_n, mask=offs_n < N, other=1.0).to(tl.float32)
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _base_loop(acc, X_ptr, x_row_stride, x_col_stride, W_ptr, w_row_stride, w_col_stride,
                     D_ptr, d_row_stride, d_col_stride, beta, scale, offs_m, offs_n, M, N, K,
                     HAS_DELTA, HAS_ROW_SCALE, SWAP_AB, BLOCK_K, PRECISION)
    if HAS_ROW_SCALE and not HAS_DELTA:  # DoRA: scales only the base term, hence before the rank loop
        acc = acc * _along_n(scale, SWAP_AB)
    if HAS_LOWRANK:
        if USE_PDL:
            gdc_wait()  # launched while the shrink ran (programmatic dependent launch): t is ready now
        acc = _rank_loop(acc, T_ptr, t_row_stride, U_ptr, u_row_stride, u_col_stride, offs_m, offs_n,
                         M, N, R, SWAP_AB, BLOCK_R, PRECISION)
    if HAS_BIAS:
        acc += _along_n(tl.load(Bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32), SWAP_AB)
    if SWAP_AB:
        acc = tl.trans(acc)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(Y_ptr + offs_m[:, None] * y_row_stride + offs_n[None, :],
             acc.to(Y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _triton_mode() -> str | None:
    """"interpret", "compile", or None: no triton, or TRITON_INTERPRET=1 set after `import triton`.

    Triton binds interpreter vs compiler when a function is decorated, so its own library
    (`tl.cdiv`) and our kernels must agree; a mix cannot run, and we use the references.
    """
    if triton is None:
        return None
    from triton.runtime.interpreter import InterpretedFunction

    lib, ours = (isinstance(f, InterpretedFunction) for f in (tl.cdiv, _readapt_linear_kernel))
    if lib != ours:
        logger.warning("TRITON_INTERPRET changed after triton was imported; using the PyTorch references")
        return None
    return "interpret" if ours else "compile"


TRITON_MODE = _triton_mode()
INTERPRET = TRITON_MODE == "interpret"


def _autotuned_kernel():
    """The fused GEMM under `triton.autotune`, choosing among `tuning.candidates` per shape.

    Keyed on (M bucket, N, K, R bucket, which terms are present, dtypes): a serving process
    tunes each projection shape once per M bucket (about a second each), then reuses the
    choice. R is bucketed too: LoRE ranks differ from module to module, and a Llama's 224
    projections must not each pause to tune.
    BLOCK_R is not tuned: `tuning.rank_block` fits it to R at launch.
    """
    by_tile = {c: triton.Config(dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                                     GROUP_M=c.group_m, SWAP_AB=c.swap_ab),
                                num_warps=c.num_warps, num_stages=c.num_stages)
               for c in tuning.DECODE_CONFIGS + tuning.PREFILL_CONFIGS + [tuning.FP32_CONFIG]}

    def prune(configs, named_args, **kwargs):
        x = named_args["X_ptr"]
        return [by_tile[c] for c in tuning.candidates(named_args["M"], x.element_size())]

    return triton.autotune(
        configs=list(by_tile.values()), prune_configs_by={"early_config_prune": prune},
        key=["M_BUCKET", "N", "K", "R_BUCKET", "HAS_DELTA", "HAS_LOWRANK", "HAS_ROW_SCALE", "HAS_BIAS"],
    )(_readapt_linear_kernel)


_tuned_kernel = _autotuned_kernel() if TRITON_MODE == "compile" else None


# STREAM_READAPT_AUTOTUNE=0: on CUDA, take each regime's first candidate instead of timing them all
# (no tuning pause on a new shape; slower kernels on some shapes).
AUTOTUNE = os.environ.get("STREAM_READAPT_AUTOTUNE", "1") != "0"


def _pick_config(M: int, N: int, K: int, R: int, x: torch.Tensor) -> TileConfig | None:
    """Explicit tiles, or None to let the autotuner choose (CUDA). Tests monkeypatch this."""
    if INTERPRET and not x.is_cuda:
        # Small tiles: ragged K/N/R take several masked iterations.
        return TileConfig(32, 64, 32, 32, group_m=2, num_warps=1, num_stages=1)
    return None if AUTOTUNE else tuning.candidates(M, x.element_size())[0]


def _pick_shrink(M: int, K: int, R: int, x: torch.Tensor, overlapped: bool) -> ShrinkConfig:
    """`overlapped`: the GEMM will run its base loop while the shrink runs (dependent launch)."""
    if INTERPRET and not x.is_cuda:  # decode exercises split-K
        return ShrinkConfig(32, 32, 32, split_k=2 if M <= tuning.DECODE_MAX_M else 1, num_warps=1, num_stages=1)
    return tuning.shrink_config(M, K, R, _num_sms(x.device), x.element_size(), overlapped=overlapped)


def _precision(x: torch.Tensor) -> str | None:
    # fp32 inputs must stay IEEE (TF32 would cost ~1e-3 relative error); 16-bit: the default.
    return "ieee" if x.dtype == torch.float32 else None


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper or newer, and a Triton that exposes it."""
    return HAS_GDC and torch.cuda.get_device_capability(device)[0] >= 9


def _shrink(x2: torch.Tensor, down: torch.Tensor, cfg: ShrinkConfig, use_pdl: bool) -> torch.Tensor:
    """t = x·down: [M, R] in fp32.

    Why fp32: split-K partial sums meet in atomic adds, which need fp32; t is tiny (M×R, vs
    M×N for y) so its extra bytes barely count; and t stays unrounded until the main kernel,
    which rounds each t tile to the weight dtype right before its dot, so the rank loop runs
    on the same tensor-core path as the base loop (and fp32 inputs stay exact).
    """
    M, K = x2.shape
    R = down.shape[1]
    alloc = torch.zeros if cfg.split_k > 1 else torch.empty
    t = alloc((M, R), device=x2.device, dtype=torch.float32)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(R, cfg.block_r), cfg.split_k)
    _shrink_kernel[grid](x2, down, t, M, K, R, *x2.stride(), *down.stride(), t.stride(0),
                         BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k,
                         SPLIT_K=cfg.split_k, USE_PDL=use_pdl, PRECISION=_precision(x2),
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return t


def _launch(x, weight, delta, beta, down, up, bias, row_scale, out):
    """Flatten x to 2-D, run the shrink, then the fused GEMM into `out` (or a new tensor)."""
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    M, R = x2.shape[0], (down.shape[1] if down is not None else 0)
    y = _output(x, N, out)
    if M == 0:
        return y
    # The main GEMM may start while the shrink still runs, and waits for t only before its
    # rank loop. Only right after our own shrink: x and W were complete before it began.
    use_pdl = R > 0 and not INTERPRET and x2.is_cuda and _pdl_supported(x2.device)
    t = _shrink(x2, down, _pick_shrink(M, K, R, x2, use_pdl), use_pdl) if R > 0 else None
    _gemm(x2, weight, delta, beta, t, up, bias, row_scale, y.view(M, N), _pick_config(M, N, K, R, x2), use_pdl)
    return y


def _gemm(x2, weight, delta, beta, t, up, bias, row_scale, y2, cfg: TileConfig | None, use_pdl: bool) -> None:
    """Launch the fused GEMM (autotuned when `cfg` is None); absent terms get placeholder
    pointers that are never read."""
    (M, K), N = x2.shape, weight.shape[0]
    d = delta if delta is not None else weight
    t_, up_ = (t, up) if t is not None else (y2, weight)
    bias_ = bias.contiguous() if bias is not None else y2
    scale_ = row_scale.contiguous() if row_scale is not None else y2
    R = t.shape[1] if t is not None else 0
    args = (x2, weight, d, t_, up_, scale_, bias_, y2, M, N, K, R, float(beta), tuning.m_bucket(M),
            tuning.m_bucket(R) if R else 0,
            *x2.stride(), *weight.stride(), *d.stride(), t_.stride(0), *up_.stride(), y2.stride(0))
    flags = dict(HAS_DELTA=delta is not None, HAS_LOWRANK=t is not None, HAS_ROW_SCALE=row_scale is not None,
                 HAS_BIAS=bias is not None, USE_PDL=use_pdl, PRECISION=_precision(x2))
    if use_pdl:
        flags["launch_pdl"] = True
    if cfg is None:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        _tuned_kernel[grid](*args, **flags, BLOCK_R=tuning.rank_block(R))
        return
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _readapt_linear_kernel[grid](
        *args, **flags, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_R=cfg.block_r or tuning.rank_block(R), GROUP_M=cfg.group_m, SWAP_AB=cfg.swap_ab,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _use_triton(x: torch.Tensor) -> bool:
    return INTERPRET or (TRITON_MODE == "compile" and x.is_cuda)


def readapt_linear_lowrank(x, weight, down, up, *, bias=None, row_scale=None, out=None):
    """Fused y = (x·Wᵀ)⊙row_scale + (x·down)·upᵀ + bias, never forming the merged weight.

    Args:
        x: [..., K] activations (bf16, fp16 or fp32).
        weight: [N, K] base weight Φ (like `nn.Linear.weight`), x's dtype.
        down: [K, R] and up: [N, R], x's dtype, e.g. from `fold_lowrank`.
        bias: optional [N]. row_scale: optional [N] (DoRA), any float dtype.
        out: optional contiguous [..., N] tensor of x's dtype to write into.
    Returns:
        y: [..., N] in x's dtype (fp32 accumulation). Falls back to
        `readapt_linear_lowrank_ref` without Triton or CUDA (unless TRITON_INTERPRET=1).

    Example:
        >>> down, up, scale = fold_lowrank(U, S, V, A, B, s, alpha=0.5, beta=0.5)
        >>> y = readapt_linear_lowrank(x, layer.weight, down, up, bias=layer.bias, row_scale=scale)
    """
    _check(x, weight, None, down, up, bias, row_scale)
    if not _use_triton(x):
        return readapt_linear_lowrank_ref(x, weight, down, up, bias=bias, row_scale=row_scale, out=out)
    return _launch(x, weight, None, 0.0, down, up, bias, row_scale, out)


def readapt_linear_full(x, weight, delta, beta, *, bias=None, row_scale=None, down=None, up=None, out=None):
    """Fused y = x·(row_scale⊙W + β·Δ)ᵀ + (x·down)·upᵀ + bias, merging W and Δ tile by tile.

    Args:
        x: [..., K]; weight, delta: [N, K] (full RE-Adapter Δ = Θ − Φ), all x's dtype.
        beta: float scale of Δ. down/up: optional [K, R]/[N, R] low-rank term (e.g. a LoRA
            folded by `fold_lowrank`). bias, row_scale: optional [N]. out: as in
            `readapt_linear_lowrank`.
    Returns:
        y: [..., N] in x's dtype.

    Example:
        >>> y = readapt_linear_full(x, layer.weight, delta, 0.5, bias=layer.bias)
    """
    _check(x, weight, delta, down, up, bias, row_scale)
    if not _use_triton(x):
        return readapt_linear_full_ref(x, weight, delta, beta, bias=bias, row_scale=row_scale,
                                       down=down, up=up, out=out)
    if beta == 0:  # nothing to add: skip reading Δ, half the weight traffic
        delta = None
    return _launch(x, weight, delta, beta, down, up, bias, row_scale, out)


def _check(x, weight, delta, down, up, bias, row_scale):
    """Raise ValueError naming the argument whose shape, dtype or device does not fit."""
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} must be [..., K] and [N, K]")
    N, K = weight.shape
    if (down is None) != (up is None):
        raise ValueError("pass both `down` and `up` or neither")
    want = {"weight": (weight, (N, K)), "delta": (delta, (N, K))}
    if down is not None:
        want.update(down=(down, (K, down.shape[-1])), up=(up, (N, down.shape[-1])))
    for name, (t, shape) in want.items():
        if t is not None and (tuple(t.shape) != shape or t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name} is {tuple(t.shape)} {t.dtype} on {t.device}; expected {shape} "
                             f"{x.dtype} on {x.device} (cast with .to(x))")
    for name, t in (("bias", bias), ("row_scale", row_scale)):
        if t is not None and (tuple(t.shape) != (N,) or not t.is_floating_point() or t.device != x.device):
            raise ValueError(f"{name} must be a float [{N}] tensor on {x.device}, got {tuple(t.shape)} {t.dtype}")


def _output(x: torch.Tensor, N: int, out: torch.Tensor | None) -> torch.Tensor:
    shape = (*x.shape[:-1], N)
    if out is None:
        return torch.empty(shape, device=x.device, dtype=x.dtype)
    if tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {shape} {x.dtype} tensor on {x.device}, "
                         f"got {tuple(out.shape)} {out.dtype}")
    return out


# ----------------------------------------------------------------------------- references


def fold_lowrank(U=None, S=None, V=None, A=None, B=None, s=1.0, *, alpha=0.5, beta=0.5,
                 magnitude_scale=None, dtype=None):
    """Fold a LoRE-Adapter and a LoRA/DoRA into the skinny pair of the fused forward.

    With Δ ≈ U·diag(S)·Vᵀ (U: [N, k], S: [k] or None if already folded into U or V,
    V: [K, k]) and the knowledge adapter Ψ = s·B·A (A: [r, K], B: [N, r]):

        down      = [β·V·diag(S), α·s·Aᵀ]                  # [K, k + r]
        up        = [U, c⊙B]                                # [N, k + r]
        row_scale = 1 + α·(c − 1)                           # [N], DoRA only, else None

    where c = m / ‖Φ + s·B·A‖_row is DoRA's per-output-row `magnitude_scale` (None for
    LoRA: c = 1). Then x·(Φ + α·Ψ + β·Δ)ᵀ = (x·Φᵀ)⊙row_scale + (x·down)·upᵀ, as computed by
    `readapt_linear_lowrank`. Either part may be omitted (pass U/S/V or A/B as None).

    Args:
        dtype: dtype of down/up (default: that of U or A); folding itself runs in fp32.
    Returns:
        (down, up, row_scale); down/up are None when there is no low-rank part.

    Example:
        >>> down, up, row_scale = fold_lowrank(U, S, V, A, B, s=2.0, alpha=0.5, beta=0.5)
    """
    downs, ups = [], []
    if U is not None:
        v = _f32(V) * (_f32(S)[None, :] if S is not None else 1.0)
        downs.append(beta * v)
        ups.append(_f32(U))
    if A is not None:
        b = _f32(B) * (_f32(magnitude_scale)[:, None] if magnitude_scale is not None else 1.0)
        downs.append((alpha * s) * _f32(A).T)
        ups.append(b)
    row_scale = None if magnitude_scale is None else 1.0 + alpha * (_f32(magnitude_scale) - 1.0)
    if not downs:
        return None, None, row_scale
    dtype = dtype or (U if U is not None else A).dtype
    return torch.cat(downs, 1).to(dtype).contiguous(), torch.cat(ups, 1).to(dtype).contiguous(), row_scale


def _f32(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64, so the fold can be checked exactly)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def readapt_linear_lowrank_ref(x, weight, down, up, *, bias=None, row_scale=None, out=None):
    """Reference (and CPU path) of `readapt_linear_lowrank`: the same formula in fp32."""
    _check(x, weight, None, down, up, bias, row_scale)
    xf = x.float()
    y = xf @ weight.float().T
    if row_scale is not None:
        y = y * row_scale.float()
    return _finish_ref(y, xf, x, down, up, bias, out)


def readapt_linear_full_ref(x, weight, delta, beta, *, bias=None, row_scale=None, down=None, up=None, out=None):
    """Reference (and CPU path) of `readapt_linear_full`: merges in fp32, one fp32 copy of W."""
    _check(x, weight, delta, down, up, bias, row_scale)
    merged = weight.to(torch.float32, copy=True)
    if row_scale is not None:
        merged.mul_(row_scale.float()[:, None])
    merged.add_(delta.float(), alpha=float(beta))
    xf = x.float()
    return _finish_ref(xf @ merged.T, xf, x, down, up, bias, out)


def _finish_ref(y, xf, x, down, up, bias, out):
    """Add the low-rank term and bias in fp32, then cast to x's dtype (into `out` if given)."""
    if down is not None and down.shape[1] > 0:
        y = y + (xf @ down.float()) @ up.float().T
    if bias is not None:
        y = y + bias.float()
    y = _output(x, y.shape[-1], out).copy_(y)
    return y
