"""stream_readapt/live/readapt_linear.py on the CPU: Triton kernels through the interpreter, the plain-PyTorch
references and `fold_lowrank`, all against float64. bf16 and large shapes: test_readapt_linear_gpu.py.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    # Triton binds interpreter vs compiler at decoration: this must precede the first
    # `import triton` of the session (a conftest.py is the surest place for it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from stream_readapt.live import readapt_linear as rl  # noqa: E402
from utils_compare import assert_rel_close  # noqa: E402

# Interpreter on the CPU; on a CUDA machine without TRITON_INTERPRET the same tests run compiled.
DEVICE = "cuda" if rl.TRITON_MODE == "compile" and torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not (rl.INTERPRET or DEVICE == "cuda"),
    reason="Triton kernels need CUDA or the interpreter: triton is missing, or it was imported before "
           "TRITON_INTERPRET=1 was set (run `TRITON_INTERPRET=1 pytest tests/test_readapt_linear.py`)")

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}
# (M, K, N, R): K, N not multiples of any tile; ranks 1, 7, 64, 300; decode and prefill M.
SHAPES = [(1, 67, 45, 1), (3, 130, 257, 7), (17, 67, 45, 300), (129, 67, 100, 64)]
KERNEL_DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
# (the interpreter's bf16 dot is broken upstream: bf16 runs in test_readapt_linear_gpu.py)


def _randn(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)


def _problem(M, K, N, R, dtype, *, bias=False, dora=False, full=False, lead=()):
    """Keyword arguments for both ops (delta/beta only when `full`), magnitudes kept near 1."""
    p = {"x": _randn(*lead, M, K, dtype=dtype), "weight": _randn(N, K, dtype=dtype, scale=K ** -0.5)}
    if R:
        p["down"] = _randn(K, R, dtype=dtype, scale=K ** -0.5)
        p["up"] = _randn(N, R, dtype=dtype, scale=R ** -0.5)
    if bias:
        p["bias"] = _randn(N, dtype=dtype, scale=0.5)
    if dora:
        p["row_scale"] = 1.0 + 0.2 * torch.randn(N, device=DEVICE)
    if full:
        p["delta"], p["beta"] = _randn(N, K, dtype=dtype, scale=0.5 * K ** -0.5), 0.5
    return p


def _expected(x, weight, delta=None, beta=0.0, down=None, up=None, bias=None, row_scale=None):
    """x·(row_scale⊙W + β·Δ)ᵀ + (x·down)·upᵀ + bias in float64, from the same rounded inputs."""
    w = weight.double() * (row_scale.double()[:, None] if row_scale is not None else 1.0)
    if delta is not None:
        w = w + beta * delta.double()
    y = x.double() @ w.T
    if down is not None:
        y = y + (x.double() @ down.double()) @ up.double().T
    return y + bias.double() if bias is not None else y


def _call(op, p):
    """Run the lowrank or full op into a NaN-poisoned `out`, so unwritten elements fail."""
    out = torch.full((*p["x"].shape[:-1], p["weight"].shape[0]), float("nan"), dtype=p["x"].dtype, device=DEVICE)
    kw = {k: v for k, v in p.items() if k not in ("x", "weight", "delta", "beta", "down", "up")}
    if op == "full":
        y = rl.readapt_linear_full(p["x"], p["weight"], p["delta"], p["beta"],
                                   down=p.get("down"), up=p.get("up"), out=out, **kw)
    else:
        y = rl.readapt_linear_lowrank(p["x"], p["weight"], p["down"], p["up"], out=out, **kw)
    assert y.data_ptr() == out.data_ptr() and y.dtype == p["x"].dtype
    return y


@needs_triton
@KERNEL_DTYPES
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}-N{}-R{}".format(*s))
@pytest.mark.parametrize("bias, dora", [(False, False), (True, True)], ids=["plain", "bias+dora"])
def test_lowrank_kernel_matches_float64(dtype, shape, bias, dora):
    p = _problem(*shape, dtype, bias=bias, dora=dora)
    assert_rel_close(_call("lowrank", p), _expected(**p), TOL[dtype], "lowrank")


@needs_triton
@KERNEL_DTYPES
@pytest.mark.parametrize("shape, beta, rank, bias, dora", [
    ((1, 67, 45, 0), 0.5, 0, False, False),
    ((3, 130, 257, 0), -1.0, 0, True, True),
    ((17, 67, 45, 0), 0.0, 7, True, False),
    ((129, 67, 100, 0), 1.0, 64, False, True),
], ids=["M1", "M3-bias-dora", "M17-lora-beta0", "M129-lora-dora"])
def test_full_kernel_matches_float64(dtype, shape, beta, rank, bias, dora):
    M, K, N, _ = shape
    p = _problem(M, K, N, rank, dtype, bias=bias, dora=dora, full=True)
    p["beta"] = beta
    assert_rel_close(_call("full", p), _expected(**p), TOL[dtype], "full")


def _adapters(N, K, k=5, r=3, dtype=torch.float64):
    """LoRE factors (U [N,k], S [k], V [K,k]) of a Δ, LoRA (A [r,K], B [N,r]), DoRA magnitude m [N].

    All in float64 but rounded through `dtype`, so the kernel sees exactly these values.
    """
    rnd = lambda t: t.to(dtype).double()  # noqa: E731
    W, delta = rnd(torch.randn(N, K, dtype=torch.float64)), 0.3 * torch.randn(N, K, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    A, B = rnd(torch.randn(r, K, dtype=torch.float64)), rnd(torch.randn(N, r, dtype=torch.float64))
    return W, (rnd(U[:, :k]), rnd(S[:k]), rnd(Vh[:k].T)), (A, B), W.norm(dim=1) * 1.1


def _materialized(W, lore, lora, s, m, alpha, beta):
    """Ω = W + α·Ψ + β·Δ_k; Ψ = s·B·A (LoRA) or W' − W, W' = diag(m/‖W+sBA‖_row)(W+sBA) (DoRA)."""
    U, S, V = lore
    A, B = lora
    adapted = W + s * B @ A
    psi = adapted - W if m is None else (m / adapted.norm(dim=1))[:, None] * adapted - W
    return W + alpha * psi + beta * (U * S) @ V.T, (None if m is None else m / adapted.norm(dim=1))


# Each of 0, 0.5, 1, -1 appears as alpha, beta and s.
SCALES = [(0.0, 0.5, 1.0), (0.5, 1.0, -1.0), (1.0, -1.0, 0.5), (-1.0, 0.0, 0.0)]


@pytest.mark.parametrize("alpha, beta, s", SCALES)
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fold_lowrank_matches_materialized(alpha, beta, s, dora):
    W, lore, lora, m = _adapters(37, 29)
    omega, c = _materialized(W, lore, lora, s, m if dora else None, alpha, beta)
    down, up, row_scale = rl.fold_lowrank(*lore, *lora, s, alpha=alpha, beta=beta, magnitude_scale=c)
    assert (row_scale is None) == (not dora) and down.shape == (29, 8) and up.shape == (37, 8)
    scaled = W * row_scale[:, None] if dora else W
    assert_rel_close(scaled + up @ down.T, omega, 1e-12, "folded weight")


@needs_triton
@KERNEL_DTYPES
@pytest.mark.parametrize("alpha, beta, s", SCALES)
def test_fold_then_kernel_matches_materialized(dtype, alpha, beta, s):
    W, lore, lora, m = _adapters(45, 67, dtype=dtype)
    omega, c = _materialized(W, lore, lora, s, m, alpha, beta)
    down, up, row_scale = rl.fold_lowrank(*lore, *lora, s, alpha=alpha, beta=beta, magnitude_scale=c, dtype=dtype)
    x = _randn(2, 3, 67, dtype=dtype)
    p = {"x": x, "weight": W.to(DEVICE, dtype), "down": down.to(DEVICE), "up": up.to(DEVICE),
         "row_scale": row_scale.to(DEVICE)}
    assert_rel_close(_call("lowrank", p).cpu(), x.double().cpu() @ omega.T, TOL[dtype], "fold → kernel")


def test_fold_lowrank_parts_are_optional():
    W, (U, S, V), (A, B), m = _adapters(11, 13)
    down, up, rs = rl.fold_lowrank(U * S, None, V, beta=2.0)
    assert rs is None and torch.allclose(up @ down.T, 2.0 * (U * S) @ V.T)
    down, up, _ = rl.fold_lowrank(A=A, B=B, s=0.5, alpha=1.0, dtype=torch.float32)
    assert down.dtype == torch.float32 and torch.allclose(up @ down.T, (0.5 * B @ A).float())
    assert rl.fold_lowrank(magnitude_scale=torch.full((11,), 3.0), alpha=0.5)[2].eq(2.0).all()


@needs_triton
@pytest.mark.parametrize("op", ["lowrank", "full"])
def test_leading_dims_and_noncontiguous_inputs(op):
    N, K, R = 45, 67, 7
    p = _problem(6, K, N, R, torch.float32, bias=True, dora=True, full=op == "full")
    p["x"] = _randn(K, 3, 2, dtype=torch.float32).permute(2, 1, 0)  # [2, 3, K], last dim strided
    p["weight"] = _randn(N, 2 * K, dtype=torch.float32)[:, ::2]  # row stride 2K, column stride 2
    p["up"] = _randn(R, N, dtype=torch.float32).T  # [N, R] column-major
    p["bias"], p["row_scale"] = p["bias"].repeat(2)[::2], p["row_scale"].repeat(2)[::2]  # stride 2
    if op == "full":
        p["delta"] = _randn(K, N, dtype=torch.float32).T
    y = _call(op, p)
    assert y.shape == (2, 3, N)
    assert_rel_close(y, _expected(**p), TOL[torch.float32], f"{op} with strided inputs")


TUNED = rl.tuning.DECODE_CONFIGS + rl.tuning.PREFILL_CONFIGS + [rl.tuning.FP32_CONFIG]


def _config_id(c) -> str:
    return f"m{c.block_m}n{c.block_n}k{c.block_k}g{c.group_m}" + ("-swap" if c.swap_ab else "")


@needs_triton
@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter check (compiled, 58 variants take minutes); "
                    "the GPU suite runs each regime's default tiles and the autotuner")
@pytest.mark.parametrize("op", ["lowrank", "full"])
@pytest.mark.parametrize("cfg", TUNED, ids=_config_id)
def test_every_tuned_config_is_correct(monkeypatch, op, cfg):
    """Each tile config the CUDA autotuner may pick, forced through the kernel on ragged shapes:
    M inside the config's regime and not a tile multiple, K and N ragged, several rank tiles."""
    M = cfg.block_m - 3 if cfg.block_m <= rl.tuning.DECODE_MAX_M else cfg.block_m + 37
    monkeypatch.setattr(rl, "_pick_config", lambda *a: cfg)
    # R = 41: three 16-wide rank tiles (`rank_block`), the last one ragged.
    p = _problem(M, 2 * cfg.block_k + 5, cfg.block_n + 19, 41, torch.float32,
                 bias=True, dora=True, full=op == "full")
    assert_rel_close(_call(op, p), _expected(**p), TOL[torch.float32], f"{op} {cfg}")


@needs_triton
@pytest.mark.parametrize("shrink", [
    rl.ShrinkConfig(16, 16, 16, split_k=1, num_warps=1, num_stages=1),
    rl.ShrinkConfig(16, 32, 16, split_k=5, num_warps=1, num_stages=1),
    rl.ShrinkConfig(64, 16, 32, split_k=64, num_warps=1, num_stages=1),  # more splits than K-steps
    rl.tuning.shrink_config(1, 4096, 272, n_sm=132, elem=2, overlapped=True),  # decode under PDL, as launched
    rl.tuning.shrink_config(64, 4096, 1088, n_sm=132, elem=2, overlapped=True),
], ids=["no-split", "split5", "split64", "overlapped-m1", "overlapped-m64"])
def test_shrink_split_k_agrees(monkeypatch, shrink):
    monkeypatch.setattr(rl, "_pick_shrink", lambda *a: shrink)
    p = _problem(40, 67, 45, 7, torch.float32, bias=True, dora=True)
    assert_rel_close(_call("lowrank", p), _expected(**p), TOL[torch.float32], str(shrink))


@pytest.mark.parametrize("M, block_m", [(1, 16), (16, 16), (17, 32), (33, 64), (64, 64)])
def test_decode_candidates_cover_every_row_once(M, block_m):
    """Decode tiles hold all M rows, so the weight is streamed once."""
    got = rl.tuning.candidates(M, 2)
    assert got and all(c.block_m == block_m for c in got)


def test_prefill_candidates_and_buckets():
    assert rl.tuning.candidates(65, 2) == rl.tuning.PREFILL_CONFIGS
    assert rl.tuning.candidates(1, 4) == rl.tuning.candidates(4096, 4) == [rl.tuning.FP32_CONFIG]
    assert [rl.tuning.m_bucket(m) for m in (1, 2, 3, 64, 65, 2048, 2049, 10 ** 6)] == \
        [1, 2, 4, 64, 128, 2048, 4096, 8192]
    assert [rl.tuning.rank_block(r) for r in (64, 272, 1040, 80, 7)] == [64, 32, 64, 16, 16]
    # The shrink splits K to fill the SMs, but keeps ≥ 4 K-steps per split.
    cfg = rl.tuning.shrink_config(1, 4096, 272, n_sm=132, elem=2)
    assert cfg.split_k > 1 and cfg.split_k * 4 * cfg.block_k <= 4096 + 4 * cfg.block_k
    # Under dependent launch a decode shrink hides behind the base loop: no split (no zero fill,
    # no atomics), narrow R tiles; no wider than the narrowest decode GEMM tile (block_n 32).
    for M, R in [(1, 272), (16, 80), (64, 1088)]:
        cfg = rl.tuning.shrink_config(M, 4096, R, n_sm=132, elem=2, overlapped=True)
        assert cfg.split_k == 1 and cfg.block_r <= min(c.block_n for c in rl.tuning.DECODE_CONFIGS)
        assert cfg.block_m == rl.tuning.decode_block_m(M)
    assert rl.tuning.shrink_config(2048, 4096, 272, n_sm=132, elem=2, overlapped=True) == \
        rl.tuning.shrink_config(2048, 4096, 272, n_sm=132, elem=2)  # prefill: unchanged


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["lowrank", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}-N{}-R{}".format(*s))
def test_references_match_float64(dtype, op, shape):
    ref = rl.readapt_linear_full_ref if op == "full" else rl.readapt_linear_lowrank_ref
    p = _problem(*shape, dtype, bias=True, dora=True, full=op == "full", lead=(2,))
    args = [p["x"], p["weight"]] + ([p["delta"], p["beta"]] if op == "full" else [p["down"], p["up"]])
    kw = {"down": p["down"], "up": p["up"]} if op == "full" else {}
    y = ref(*args, bias=p["bias"], row_scale=p["row_scale"], **kw)
    assert y.dtype == dtype and y.shape == (2, shape[0], shape[2])
    assert_rel_close(y, _expected(**p), TOL[dtype], f"{op}_ref")


def test_full_reference_leaves_fp32_weight_untouched():
    p = _problem(3, 11, 5, 0, torch.float32, dora=True, full=True)
    before = p["weight"].clone()
    rl.readapt_linear_full_ref(p["x"], p["weight"], p["delta"], 0.5, row_scale=p["row_scale"])
    assert torch.equal(p["weight"], before)


FALLBACK_SCRIPT = """
import sys, torch
{setup}
from stream_readapt.live import readapt_linear as rl
x, w, d = torch.randn(2, 3), torch.randn(4, 3), torch.randn(4, 3)
assert not rl._use_triton(x), rl.TRITON_MODE
assert torch.equal(rl.readapt_linear_full(x, w, d, 0.5), rl.readapt_linear_full_ref(x, w, d, 0.5))
"""
SETUPS = {
    "no-triton": ("sys.modules['triton'] = None  # `import triton` raises ImportError", "0"),
    "mixed": ("import os; os.environ['TRITON_INTERPRET'] = '0'; import triton; "
              "os.environ['TRITON_INTERPRET'] = '1'", "0"),  # set after `import triton`
}


@pytest.mark.parametrize("case", SETUPS)
def test_falls_back_to_reference(case):
    """Imports without triton, and uses the reference whenever the kernels cannot run."""
    setup, interpret = SETUPS[case]
    env = {**os.environ, "TRITON_INTERPRET": interpret, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT.format(setup=setup)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr


def test_cpu_tensors_use_reference_when_compiled(monkeypatch):
    monkeypatch.setattr(rl, "INTERPRET", False)
    monkeypatch.setattr(rl, "TRITON_MODE", "compile")
    monkeypatch.setattr(rl, "_launch", None)  # must not be reached
    p = _problem(3, 11, 5, 2, torch.float32, bias=True)
    x, w, down, up = (p[k].cpu() for k in ("x", "weight", "down", "up"))
    y = rl.readapt_linear_lowrank(x, w, down, up)
    assert torch.equal(y, rl.readapt_linear_lowrank_ref(x, w, down, up))


@needs_triton
def test_empty_batch():
    p = _problem(0, 7, 5, 3, torch.float32)
    assert _call("lowrank", p).shape == (0, 5)


@pytest.mark.parametrize("change, match", [
    (dict(weight=torch.zeros(5, 7, dtype=torch.float16)), "weight"),
    (dict(up=torch.zeros(4, 3)), "up"),
    (dict(up=None), "both"),
    (dict(bias=torch.zeros(4)), "bias"),
    (dict(out=torch.zeros(2, 4)), "out"),
    (dict(out=torch.zeros(5, 2).T), "out"),
])
def test_bad_arguments_raise_value_error(change, match):
    kw = dict(weight=torch.zeros(5, 7), down=torch.zeros(7, 3), up=torch.zeros(5, 3)) | change
    with pytest.raises(ValueError, match=match):
        rl.readapt_linear_lowrank(torch.zeros(2, 7), kw.pop("weight"), kw.pop("down"), kw.pop("up"), **kw)


@pytest.mark.skipif(rl.triton is None, reason="needs triton")
def test_autotuner_offers_each_regime_its_table():
    """The CUDA autotuner (built here without a GPU) times only the candidates of M's regime."""
    tuner = rl._autotuned_kernel()  # Triton checks that every key names a kernel argument

    def offered(M, dtype):
        configs = tuner.early_config_prune(tuner.configs, {"X_ptr": torch.empty(1, dtype=dtype), "M": M})
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SWAP_AB"], c.num_warps,
                 c.num_stages) for c in configs]

    def table(configs):
        return [(c.block_m, c.block_n, c.block_k, c.swap_ab, c.num_warps, c.num_stages) for c in configs]

    assert offered(3, torch.bfloat16) == table(rl.tuning.candidates(3, 2)) and len(offered(3, torch.bfloat16)) > 1
    assert offered(2048, torch.float16) == table(rl.tuning.PREFILL_CONFIGS)
    assert offered(2048, torch.float32) == table([rl.tuning.FP32_CONFIG])
