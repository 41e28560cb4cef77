"""Comparison helpers for kernel tests: relative errors against float64, verbose mismatches."""
from __future__ import annotations

import torch


def rel_fro_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖_F / ‖expected‖_F in float64 (NaN/Inf in `actual` give inf)."""
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


def describe_mismatches(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
                        max_print: int = 8) -> str:
    """The first mismatching elements (index, actual, expected) and the NaN/Inf disagreements."""
    a, e = actual.double().flatten(), expected.double().flatten()
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    lines = [f"{int(bad.sum())}/{a.numel()} elements differ (atol={atol:g}, rtol={rtol:g}); "
             f"NaN in actual/expected: {int(a.isnan().sum())}/{int(e.isnan().sum())}, "
             f"Inf: {int(a.isinf().sum())}/{int(e.isinf().sum())}"]
    for i in bad.nonzero().flatten()[:max_print].tolist():
        idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), actual.shape))
        lines.append(f"  at {idx}: actual {a[i].item():.8g}, expected {e[i].item():.8g}")
    return "\n".join(lines)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """Assert shapes match and the relative Frobenius error ≤ tol; print the first mismatches if not."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_fro_error(actual, expected)
    if not err <= tol:
        scale = float(expected.double().abs().max())
        detail = describe_mismatches(actual, expected, atol=tol * scale, rtol=tol)
        raise AssertionError(f"{what}: relative Frobenius error {err:.3e} > {tol:.1e}\n{detail}")
