"""Peak RSS of a merge is bounded by the row block, not by the largest tensor."""

from __future__ import annotations

import subprocess
import sys

import pytest

from big_checkpoint import COLS, ROWS, write_big_checkpoint


def _peak_rss_mb(code: str) -> float:
    wrapped = code + "\nimport resource; print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    done = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.split("PEAK")[-1])


@pytest.mark.slow
def test_merge_peak_rss_is_bounded(tmp_path):
    write_big_checkpoint(tmp_path / "base", 0)
    write_big_checkpoint(tmp_path / "instruct", 1)
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
