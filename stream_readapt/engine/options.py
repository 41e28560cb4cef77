"""How a streaming pass runs, as one record passed down instead of a long argument list."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from .streaming import DEFAULT_BLOCK_BYTES, block_bytes_for, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)


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

    def for_inputs(self, *ckpts, what: str) -> "RunOptions":
        """The options for these inputs: a quantized input (read as float32) has no dtype of its
        own to keep, so `what` is written in bfloat16 unless `--dtype` says otherwise."""
        quantized = [c for c in ckpts if getattr(c, "scheme", None) is not None]
        if self.dtype is not None or not quantized:
            return self
        logger.info("%s is quantized (%s): writing %s in bfloat16 (--dtype to choose)", quantized[0].source,
                    quantized[0].scheme.describe(), what)
        return replace(self, dtype=torch.bfloat16)

    @property
    def dtype_name(self) -> str | None:
        return str(self.dtype).replace("torch.", "") if self.dtype else None


@dataclass(frozen=True)
class Scales:
    """Ω = Φ + α·Ψ + β·Δ."""

    alpha: float
    beta: float
