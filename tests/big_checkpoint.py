"""A checkpoint whose one tensor is far larger than a row block, written block by block.

Memory tests stream it and check that peak memory (RSS, or CUDA memory) follows the row
block, not the tensor. Written with our streaming writer so that building it costs no more
memory than the tests allow the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stream_readapt.io.writer import CheckpointWriter

ROWS, COLS = 40_000, 4096  # model.embed_tokens.weight: 328 MB in bf16, 655 MB in float32
BLOCK_ROWS = 2_000
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True}


def write_big_checkpoint(folder: Path, seed: int) -> Path:
    """A tied Llama-like checkpoint: the big embedding and a norm; `seed` varies the rows."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    block = torch.randn(BLOCK_ROWS, COLS, generator=gen).to(torch.bfloat16)
    writer = CheckpointWriter(folder, [["model.embed_tokens.weight", "model.norm.weight"]], metadata={"format": "pt"})
    writer.begin("model.embed_tokens.weight", torch.bfloat16, (ROWS, COLS))
    for i in range(ROWS // BLOCK_ROWS):
        writer.write(torch.roll(block, shifts=i + seed, dims=1))  # cheap, non-repeating rows
    writer.end()
    writer.add("model.norm.weight", torch.ones(COLS, dtype=torch.bfloat16))
    writer.finalize()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder
