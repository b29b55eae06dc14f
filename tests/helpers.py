"""Helpers shared by the test modules."""
import torch


def rel_err(x: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """||x - ref|| / max(||ref||, floor) in float64. Fails when x holds NaN or inf where ref is finite (an
    element a kernel did not write, or an overflow). `floor` keeps an exactly-zero reference (say dq of a
    query with one key) from turning rounding noise into a huge relative error."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(x).all() or not torch.isfinite(ref).all(), "non-finite values in the output"
    return float((x - ref).norm() / ref.norm().clamp_min(max(floor, 1e-30)))


def loss_and_grads(model, *args, **kwargs):
    """(loss, {parameter name: gradient}) of one training step: model(*args, **kwargs).loss backward."""
    out = model(*args, **kwargs)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(step_a, step_b, tol: float = 1e-10) -> None:
    """Two loss_and_grads results agree: losses within 1e-12, every gradient within tol relative to its max."""
    (loss_a, grads_a), (loss_b, grads_b) = step_a, step_b
    assert abs(float(loss_a - loss_b)) < 1e-12
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name, g in grads_a.items():
        assert (grads_b[name] - g).abs().max() <= tol * (1 + g.abs().max()), name
