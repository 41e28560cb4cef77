"""Triton kernels (and their plain-PyTorch references), installed as `stream_readapt.kernels`."""
