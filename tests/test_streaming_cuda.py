"""The streaming passes on a CUDA device (`--device cuda`, the default where a GPU exists):
the same results as the float64 references, and GPU memory that follows the row block, not
the tensor. The CPU runs of the same passes are test_merge.py, test_extract.py, test_lore.py
and test_memory.py."""

from __future__ import annotations

import pytest
import torch

import fixtures_models as fm
from big_checkpoint import COLS, ROWS, write_big_checkpoint
from stream_readapt import extract, merge
from test_extract import load_readapter
from test_lore import assert_ranks_reach_energy_and_are_minimal
from test_merge import assert_matches

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_merge_on_cuda_matches_float64(llama_pair, dora_adapter, tmp_path):
    merge(llama_pair.base, tmp_path / "out", instruct=llama_pair.instruct, knowledge=dora_adapter, device="cuda")
    reference = fm.reference_readapt_float64(llama_pair.base, llama_pair.instruct, dora_adapter, 0.5, 0.5)
    assert_matches(tmp_path / "out", reference, 1e-6)


def test_full_readapter_on_cuda_is_exact(llama_pair, lora_adapter, tmp_path):
    """Δ = Θ − Φ in float32 is exact on any device; merging from it equals merging from Θ."""
    extract(llama_pair.base, llama_pair.instruct, tmp_path / "re", device="cuda")
    phi, theta = fm.load_state_dict(llama_pair.base), fm.load_state_dict(llama_pair.instruct)
    delta = load_readapter(tmp_path / "re")
    assert set(delta) == set(phi)
    for k in phi:
        assert torch.equal(delta[k], theta[k] - phi[k]), k
    merge(llama_pair.base, tmp_path / "out", readapter=tmp_path / "re", knowledge=lora_adapter, device="cuda")
    reference = fm.reference_readapt_float64(llama_pair.base, llama_pair.instruct, lora_adapter, 0.5, 0.5)
    assert_matches(tmp_path / "out", reference, 1e-6)


def test_lore_on_cuda_ranks_are_minimal(llama_pair, tmp_path):
    """The randomized SVD on the GPU picks the same near-minimal ranks as on the CPU (its own
    random sketch: CUDA generators differ), within 1.02× of the optimal error."""
    manifest = extract(llama_pair.base, llama_pair.instruct, tmp_path / "lore", energy=0.5, device="cuda")
    assert_ranks_reach_energy_and_are_minimal(llama_pair, manifest)


@pytest.mark.slow
def test_cuda_memory_follows_the_row_block(tmp_path):
    """A 328 MB bf16 tensor (655 MB in float32) merged and extracted in 8 MB float32 blocks:
    peak CUDA memory stays a few blocks (phi and theta in float32, their raw bf16 copies, the
    cast output), far below the tensor."""
    base, instruct = write_big_checkpoint(tmp_path / "base", 0), write_big_checkpoint(tmp_path / "instruct", 1)
    block = 8 * 2**20
    tensor_f32 = ROWS * COLS * 4
    for name, run in [
        ("merge", lambda: merge(base, tmp_path / "merged", instruct=instruct, device="cuda", block_bytes=block)),
        ("extract", lambda: extract(base, instruct, tmp_path / "re", device="cuda", block_bytes=block)),
    ]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        peak = torch.cuda.max_memory_allocated() - before
        print(f"{name}: peak CUDA memory {peak / 2**20:.0f} MiB for {block / 2**20:.0f} MiB blocks "
              f"of a {tensor_f32 / 2**20:.0f} MiB (float32) tensor")
        assert peak <= 6 * block, f"{name}: {peak / 2**20:.0f} MiB"
        assert peak < tensor_f32 / 10
