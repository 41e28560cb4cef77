"""DoRA's one formula, shared by the streaming merge and the live layers.

W' = diag(m / ‖Φ + s·B·A‖_row) · (Φ + s·B·A): the magnitude vector m rescales each output row
of the LoRA-merged weight to its learned norm (PEFT's `DoraLinearVariant`, norms per row).
The merge writes Ψ = W' − Φ row block by row block; the live layer keeps the per-row factor
c = m / ‖Φ + s·B·A‖_row, computed once at load, as PEFT detaches the norm.
"""

from __future__ import annotations

import torch


def dora_row_scale(merged: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """c = m / ‖Φ + s·B·A‖ per output row, for `merged` = Φ + s·B·A rows [n, in] and m [n]."""
    return magnitude / torch.linalg.vector_norm(merged, dim=1)


def dora_delta_rows(phi: torch.Tensor, lora: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Ψ = c·(Φ + s·B·A) − Φ for these rows; `lora` (s·B·A rows) is overwritten."""
    merged = lora.add_(phi)
    return merged.mul_(dora_row_scale(merged, magnitude)[:, None]).sub_(phi)
