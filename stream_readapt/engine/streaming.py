"""Shared pieces of the streaming passes: devices, dtypes, row blocks, progress."""

from __future__ import annotations

import math
import sys
from typing import Iterator

import torch
from tqdm import tqdm

from ..io.safetensors_reader import CheckpointError

# Row blocks hold about this many float32 bytes per operand; a pass keeps a few
# operands alive (base, other side, result, scratch). On a GPU big blocks keep the
# transfers and kernels long. On the CPU a block's operands should stay in the caches
# (2-core EPYC: 1 MiB L2 per core, 32 MiB L3): a warm 1B merge streamed in 6.0-6.9 s
# at 2 MiB, 6.9-8.2 s at 4 MiB and 12.1 s at 32 MiB, an extract 8.1-9.9 / 10.8-12.0 s
# at 2 / 4 MiB; below 2 MiB the per-block Python overhead starts to show.
DEFAULT_BLOCK_BYTES = 32 * 2**20
CPU_BLOCK_BYTES = 2 * 2**20


def block_bytes_for(device: torch.device, block_bytes: int | None = None) -> int:
    """`block_bytes` if given, else the measured best for this kind of device."""
    if block_bytes is not None:
        return block_bytes
    return CPU_BLOCK_BYTES if device.type == "cpu" else DEFAULT_BLOCK_BYTES


DTYPE_CHOICES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`auto` picks the first CUDA device when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda[:N] ({e})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device} is not supported: use auto, cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available (use --device cpu)")
    return device


def is_finite_number(value) -> bool:
    """A finite real number (numpy and torch scalars too); not a bool, a string or None."""
    try:
        return not isinstance(value, (bool, str)) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def check_scales(**scales: float) -> None:
    """α and β must be finite numbers: NaN would not even surface as NaN everywhere (a BLAS
    addmm with alpha=NaN may treat it as 1), and Inf makes every weight Inf or NaN."""
    for name, value in scales.items():
        if not is_finite_number(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPE_CHOICES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}") from None


def row_blocks(rows: int, row_numel: int, block_bytes: int, split_at: int | None = None,
               align: int = 1) -> Iterator[tuple[int, int]]:
    """[start, stop) row ranges of about `block_bytes` float32 bytes (a multiple of `align` rows:
    a quantized output's scale rows); none crosses `split_at`."""
    step = max(1, block_bytes // max(1, row_numel * 4))
    step = max(align, step - step % align)
    for lo, hi in ((0, rows if split_at is None else split_at), (split_at, rows)):
        if lo is None:
            break
        for start in range(lo, hi, step):
            yield start, min(start + step, hi)


def check_finite(block: torch.Tensor, name: str) -> None:
    # A finite sum proves every element finite (NaN and ±Inf propagate) at a fraction of
    # isfinite()'s cost; only a non-finite sum (maybe a mere overflow) gets the exact test.
    if not math.isfinite(float(block.sum())) and not torch.isfinite(block).all():
        kind = str(block.dtype).replace("torch.", "")
        raise FloatingPointError(f"NaN/Inf produced in tensor {name!r} as {kind} (check the inputs, the scales, "
                                 "and that the output dtype's range holds the result)")


def progress(total: int, desc: str, quiet: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, disable=quiet, leave=False)


def to_device_f32(block: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Block on `device` in float32 (one copy: the dtype change happens on the device)."""
    return block.to(device, non_blocking=False).to(torch.float32)


__all__ = ["CheckpointError", "CPU_BLOCK_BYTES", "DEFAULT_BLOCK_BYTES", "block_bytes_for", "resolve_device", "resolve_dtype", "row_blocks"]
