"""Helpers shared by the test modules."""
import torch


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64. Fails when x holds NaN or inf where ref is finite (an
    element a kernel did not write, or an overflow)."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(x).all() or not torch.isfinite(ref).all(), "non-finite values in the output"
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))
