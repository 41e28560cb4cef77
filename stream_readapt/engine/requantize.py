"""Writing a merged tensor back in its quantized format, a block of scale rows at a time.

`merge` keeps the instruct model's format by default: a weight Θ stored as FP8 blocks (or
8-bit compressed-tensors) is written the same way, with fresh scales for Ω. The recipe is the
one the published checkpoints use: per block, scale = amax / the format's largest value
(448 for float8_e4m3fn, 127 for int8), values rounded to nearest. Row blocks are aligned to
the scale grid, so a block's scales are final when its rows are; the scale tensor is written
right after its weight, in the same shard. The squared error of every requantized tensor is
kept for the manifest, beside the squared norm of what was quantized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..io.quantized import QuantScheme, per_block


@dataclass(frozen=True)
class Requantizer:
    """One weight's output format: values of `dtype`, a float32 scale per `block`."""

    scheme: QuantScheme
    dtype: torch.dtype  # float8_e4m3fn or int8
    shape: tuple[int, int]
    scale_name: str

    def __post_init__(self):
        if self.scheme.method == "mxfp4":
            raise ValueError("writing MXFP4 experts back is not supported yet; pass --dtype bfloat16 for a plain "
                             "checkpoint")
        if self.scheme.block_for(self.shape)[0] >= self.shape[0] > 1:
            # one scale over all rows: its amax is known only once the whole tensor is
            raise ValueError(f"writing {self.scheme.describe()} back would hold a whole tensor in memory; pass "
                             "--dtype bfloat16 for a plain checkpoint")

    @property
    def block(self) -> tuple[int, int]:
        return self.scheme.block_in(self.shape)

    @property
    def rows_per_block(self) -> int:
        return self.block[0]

    @property
    def scale_shape(self) -> tuple[int, int]:
        bn, bk = self.block
        return math.ceil(self.shape[0] / bn), math.ceil(self.shape[1] / bk)

    @property
    def top(self) -> float:
        return float(torch.finfo(self.dtype).max) if self.dtype.is_floating_point else 127.0

    def encode(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """(values, scale rows, squared error, squared norm) of float rows covering whole scale rows."""
        bn, bk = self.block
        n, cols = rows.shape
        rows = rows.float()
        full, rem = divmod(cols, bk)
        tiles = math.ceil(n / bn)
        a = rows.abs()
        if n != tiles * bn:  # a short last row tile: pad its amax with zeros
            a = torch.cat([a, a.new_zeros(tiles * bn - n, cols)])
        grid = a.view(tiles, bn, cols).amax(dim=1)
        amax = grid[:, : full * bk].view(tiles, full, bk).amax(dim=2)
        if rem:
            amax = torch.cat([amax, grid[:, full * bk:].amax(dim=1, keepdim=True)], dim=1)
        scale = (amax / self.top).clamp_min(torch.finfo(torch.float32).tiny)
        per_row = scale.repeat_interleave(bn, dim=0)[:n]
        # each scale broadcast over its block's columns through views (no expanded scale tensor)
        scaled = per_block(torch.div, rows, per_row, bk, torch.empty_like(rows)).clamp_(-self.top, self.top)
        values = scaled.to(self.dtype) if self.dtype.is_floating_point else scaled.round_().to(self.dtype)
        back = per_block(torch.mul, values.to(torch.float32), per_row, bk)
        err = float(back.sub_(rows).square_().sum(dtype=torch.float64))
        return values, scale, err, float(rows.square().sum(dtype=torch.float64))
