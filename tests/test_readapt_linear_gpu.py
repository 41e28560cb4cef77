"""stream_readapt/live/readapt_linear.py compiled on a GPU: bf16 (broken in the interpreter) and Llama-sized
shapes, against float64. Never runs under TRITON_INTERPRET; the CPU suite is test_readapt_linear.py.
"""
from __future__ import annotations

import pytest
import torch

from stream_readapt.live import readapt_linear as rl
from utils_compare import assert_rel_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(rl.TRITON_MODE != "compile",
                       reason="needs compiled Triton kernels (triton installed, TRITON_INTERPRET unset)"),
]

DTYPES = pytest.mark.parametrize("dtype, tol", [
    (torch.bfloat16, 1e-2), (torch.float16, 1e-3), (torch.float32, 1e-5)], ids=["bf16", "fp16", "fp32"])
# (M, K, N, R): Llama-3-8B projections at decode and prefill sizes, plus ragged odd ones.
SHAPES = [(1, 4096, 4096, 272), (16, 4096, 14336, 80), (64, 14336, 4096, 1088),
          (2048, 4096, 4096, 320), (333, 1000, 3001, 300), (4100, 2050, 1030, 7)]


@pytest.fixture(autouse=True)
def _untuned(request, monkeypatch):
    """Each regime's first candidate tile (one compile per variant, not one per candidate): the
    interpreter suite checks every candidate; test_autotuned_path covers the tuner itself."""
    if "autotuned" not in request.node.name:
        monkeypatch.setattr(rl, "_pick_config", lambda M, N, K, R, x: rl.tuning.candidates(M, x.element_size())[0])


def _randn(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device="cuda", dtype=torch.float64) * scale).to(dtype)


def _expected(x, weight, delta=None, beta=0.0, down=None, up=None, bias=None, row_scale=None):
    """x·(row_scale⊙W + β·Δ)ᵀ + (x·down)·upᵀ + bias in float64."""
    w = weight.double() * row_scale.double()[:, None] + (beta * delta.double() if delta is not None else 0.0)
    y = x.double() @ w.T + bias.double()
    return y + (x.double() @ down.double()) @ up.double().T if down is not None else y


def _inputs(M, K, N, R, dtype):
    x, w = _randn(M, K, dtype=dtype), _randn(N, K, dtype=dtype, scale=K ** -0.5)
    down, up = _randn(K, R, dtype=dtype, scale=K ** -0.5), _randn(N, R, dtype=dtype, scale=R ** -0.5)
    bias, row_scale = _randn(N, dtype=dtype, scale=0.5), 1.0 + 0.2 * torch.randn(N, device="cuda")
    return x, w, down, up, bias, row_scale


def _poisoned(M, N, dtype):
    return torch.full((M, N), float("nan"), device="cuda", dtype=dtype)


@DTYPES
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}-N{}-R{}".format(*s))
def test_lowrank_gpu(dtype, tol, shape):
    x, w, down, up, bias, row_scale = _inputs(*shape, dtype)
    out = _poisoned(shape[0], shape[2], dtype)
    y = rl.readapt_linear_lowrank(x, w, down, up, bias=bias, row_scale=row_scale, out=out)
    assert_rel_close(y, _expected(x, w, down=down, up=up, bias=bias, row_scale=row_scale), tol, "lowrank")


@DTYPES
@pytest.mark.parametrize("shape", SHAPES[::2] + SHAPES[-1:], ids=lambda s: "M{}-K{}-N{}-R{}".format(*s))
def test_full_gpu(dtype, tol, shape):
    x, w, down, up, bias, row_scale = _inputs(*shape, dtype)
    delta = _randn(*w.shape, dtype=dtype, scale=0.5 * shape[1] ** -0.5)
    y = rl.readapt_linear_full(x, w, delta, -0.5, bias=bias, row_scale=row_scale, down=down, up=up,
                               out=_poisoned(shape[0], shape[2], dtype))
    want = _expected(x, w, delta, -0.5, down=down, up=up, bias=bias, row_scale=row_scale)
    assert_rel_close(y, want, tol, "full")


@pytest.mark.parametrize("overlapped", [True, False], ids=["unsplit-shrink", "split-k-shrink"])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "M{}-K{}-N{}-R{}".format(*s))
def test_decode_shrink_policies(monkeypatch, shape, overlapped):
    """Both decode shrinks, whatever the card: unsplit (hidden behind the base loop under
    dependent launch, the default on Hopper) and split over K (atomics into a zero-filled t)."""
    pick = rl._pick_shrink
    monkeypatch.setattr(rl, "_pick_shrink", lambda M, K, R, x, _: pick(M, K, R, x, overlapped))
    x, w, down, up, bias, row_scale = _inputs(*shape, torch.bfloat16)
    y = rl.readapt_linear_lowrank(x, w, down, up, bias=bias, row_scale=row_scale,
                                  out=_poisoned(shape[0], shape[2], x.dtype))
    assert_rel_close(y, _expected(x, w, down=down, up=up, bias=bias, row_scale=row_scale), 1e-2, "lowrank")


def test_bf16_close_to_unfused_torch():
    """The fused bf16 result is at least as close to float64 as PyTorch's own unfused bf16 sequence."""
    x, w, down, up, _, _ = _inputs(64, 4096, 4096, 320, torch.bfloat16)
    want = _expected(x, w, down=down, up=up, bias=torch.zeros(4096, device="cuda"),
                     row_scale=torch.ones(4096, device="cuda"))
    fused = rl.readapt_linear_lowrank(x, w, down, up)
    unfused = torch.nn.functional.linear(x, w) + (x @ down) @ up.T
    err = lambda y: float((y.double() - want).norm() / want.norm())  # noqa: E731
    assert err(fused) <= 1.05 * err(unfused), (err(fused), err(unfused))


@pytest.mark.parametrize("M", [16])
def test_autotuned_path(M):
    """Through `triton.autotune` (every candidate compiled and timed), both paths, bf16. (The
    kernel benchmark checks the autotuned kernels' results at every case it times, prefill too.)"""
    assert rl.AUTOTUNE and rl._pick_config(M, 4096, 4096, 80, torch.empty(1, device="cuda")) is None
    x, w, down, up, bias, row_scale = _inputs(M, 4096, 4096, 80, torch.bfloat16)
    delta = _randn(*w.shape, dtype=torch.bfloat16, scale=0.5 / 64)
    y = rl.readapt_linear_lowrank(x, w, down, up, bias=bias, row_scale=row_scale, out=_poisoned(M, 4096, x.dtype))
    assert_rel_close(y, _expected(x, w, down=down, up=up, bias=bias, row_scale=row_scale), 1e-2, "lowrank")
    y = rl.readapt_linear_full(x, w, delta, 0.5, bias=bias, row_scale=row_scale, out=_poisoned(M, 4096, x.dtype))
    assert_rel_close(y, _expected(x, w, delta, 0.5, bias=bias, row_scale=row_scale), 1e-2, "full")


def test_cuda_graph_replay_with_dependent_launch():
    """Captured once, replayed on new activations: the shrink → GEMM dependency (programmatic
    dependent launch on Hopper) must hold inside a graph as in eager mode."""
    x, w, down, up, bias, row_scale = _inputs(4, 4096, 4096, 272, torch.bfloat16)
    static_x = x.clone()
    rl.readapt_linear_lowrank(static_x, w, down, up, bias=bias, row_scale=row_scale)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = rl.readapt_linear_lowrank(static_x, w, down, up, bias=bias, row_scale=row_scale)
    for _ in range(3):
        static_x.copy_(_randn(*x.shape, dtype=x.dtype))
        graph.replay()
        torch.cuda.synchronize()
        want = _expected(static_x, w, down=down, up=up, bias=bias, row_scale=row_scale)
        assert_rel_close(static_y, want, 1e-2, "graph replay")
