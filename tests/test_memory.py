"""Peak RSS of a merge is bounded by the row block, not by the largest tensor."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from stream_readapt.writer import CheckpointWriter

ROWS, COLS = 40_000, 4096  # one bf16 tensor of 328 MB (655 MB in float32)
BLOCK_ROWS = 2_000


def _write_big_checkpoint(folder, seed: int, config: dict) -> None:
    folder.mkdir()
    gen = torch.Generator().manual_seed(seed)
    block = torch.randn(BLOCK_ROWS, COLS, generator=gen).to(torch.bfloat16)
    writer = CheckpointWriter(folder, [["model.embed_tokens.weight", "model.norm.weight"]], metadata={"format": "pt"})
    writer.begin("model.embed_tokens.weight", torch.bfloat16, (ROWS, COLS))
    for i in range(ROWS // BLOCK_ROWS):
        writer.write(torch.roll(block, shifts=i + seed, dims=1))  # cheap, non-repeating rows
    writer.end()
    writer.add("model.norm.weight", torch.ones(COLS, dtype=torch.bfloat16))
    writer.finalize()
    (folder / "config.json").write_text(json.dumps(config))


def _peak_rss_mb(code: str) -> float:
    wrapped = code + "\nimport resource; print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    done = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.split("PEAK")[-1])


@pytest.mark.slow
def test_merge_peak_rss_is_bounded(tmp_path):
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True}
    _write_big_checkpoint(tmp_path / "base", 0, config)
    _write_big_checkpoint(tmp_path / "instruct", 1, config)
    baseline = _peak_rss_mb("import torch, stream_readapt")
    peak = _peak_rss_mb(
        "from stream_readapt import merge\n"
        f"merge({str(tmp_path / 'base')!r}, {str(tmp_path / 'out')!r}, instruct={str(tmp_path / 'instruct')!r}, device='cpu')"
    )
    tensor_mb = ROWS * COLS * 2 / 2**20
    print(f"merge peak RSS {peak:.0f} MB, after import {baseline:.0f} MB, largest tensor {tensor_mb:.0f} MB (bf16)")
    # The working set is a few 32 MB float32 blocks: far below even the bf16 tensor itself.
    assert peak - baseline < 200, f"merge peak RSS {peak:.0f} MB vs {baseline:.0f} MB after import"
    assert peak - baseline < tensor_mb / 1.5
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > ROWS * COLS * 2
