"""Triton kernels (and their plain-PyTorch references), installed as `stream_readapt.kernels`."""

from .readapt_linear import (  # noqa: F401
    fold_lowrank,
    readapt_linear_full,
    readapt_linear_full_ref,
    readapt_linear_lowrank,
    readapt_linear_lowrank_ref,
)
