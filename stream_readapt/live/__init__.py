"""Live readaptation: patch_model / set_scales and the Triton kernels with their PyTorch references."""
