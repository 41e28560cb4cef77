"""How a streaming pass runs, as one record passed down instead of a long argument list."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .streaming import DEFAULT_BLOCK_BYTES, block_bytes_for, resolve_device, resolve_dtype


@dataclass(frozen=True)
class RunOptions:
    """Device, output dtype, sharding, block size and progress of one run."""

    device: torch.device
    dtype: torch.dtype | None = None  # output dtype; None: each tensor's input dtype
    max_shard_size: int | None = None  # None: the base model's shard layout
    block_bytes: int = DEFAULT_BLOCK_BYTES
    quiet: bool = True

    @classmethod
    def resolve(cls, *, device="auto", dtype=None, max_shard_size=None, block_bytes=None,
                quiet=True) -> "RunOptions":
        """From the user's spelling (`"auto"`, `"bfloat16"`), checked; `block_bytes` None: the device's best."""
        dev = resolve_device(device)
        return cls(dev, resolve_dtype(dtype), max_shard_size, block_bytes_for(dev, block_bytes), quiet)

    @property
    def dtype_name(self) -> str | None:
        return str(self.dtype).replace("torch.", "") if self.dtype else None


@dataclass(frozen=True)
class Scales:
    """Ω = Φ + α·Ψ + β·Δ."""

    alpha: float
    beta: float
