"""Property-based check of the StreamKL Triton kernels (forward and backward) against the float64 reference.

Hypothesis draws batch or packed documents, query and key lengths (N_Q > N_K gives fully masked causal rows),
query heads with any teacher / student KV grouping, head dims of each side (also below their tile), causal
or not, direction, teacher gradients, |logit| up to 50, and fp32 or fp16 inputs.
SPARSA_PROPERTY_EXAMPLES raises the number of examples (CI runs a few).
"""

import pytest
import torch

import sparsa
from sparsa.ops.kl import naive
from tests.helpers import rel_err
from tests.ops.property import draw_cu_seqlens, hypothesis, settings, st
from tests.ops.test_attention_kl import DEVICE, _compare_attention_kl, make_inputs, needs_triton


def _divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def problems(draw):
    """(inputs, causal, cu_seqlens or None, scale_t, scale_s, dtype)."""
    packed = draw(st.booleans())
    if packed:
        cu = draw_cu_seqlens(draw, 30).to(DEVICE)
        batch, n_q = 1, int(cu[-1])
        n_k = n_q
    else:
        batch, n_q, n_k, cu = draw(st.integers(1, 2)), draw(st.integers(1, 56)), draw(st.integers(1, 56)), None
    heads = draw(st.integers(1, 4))
    heads_t, heads_s = draw(st.sampled_from(_divisors(heads))), draw(st.sampled_from(_divisors(heads)))
    dim_t, dim_s = draw(st.sampled_from([16, 24, 32])), draw(st.sampled_from([16, 24, 32]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    logit = draw(st.sampled_from([None, 50.0]))  # 50: unit keys, queries of norm 50, |logit| <= 50 at scale 1
    scale_t, scale_s = (None, None) if logit is None else (1.0, 1.0)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    inputs = make_inputs(batch, n_q, n_k, heads, heads_t, heads_s, dim_t, dim_s, torch.float64, DEVICE, 1.0, gen)
    if logit is not None:
        inputs = [x / x.norm(dim=-1, keepdim=True) * (logit if i % 2 == 0 else 1.0) for i, x in enumerate(inputs)]
    inputs = [x.to(dtype) for x in inputs]
    return inputs, draw(st.booleans()) or packed, cu, scale_t, scale_s, dtype


@needs_triton
@settings
@hypothesis.given(problems(), st.sampled_from(["forward", "reverse"]), st.booleans(), st.integers(0, 1000))
def test_attention_kl_matches_the_reference_on_drawn_problems(problem, direction, teacher_grad, seed):
    inputs, causal, cu, scale_t, scale_s, dtype = problem
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSA_BACKEND", "triton")
        tol = 2e-5 if dtype == torch.float32 else 5e-3
        # |logit| ~ 50: the forward and backward recompute the logits in different orders, and a probability
        # moves by about |logit| * 2^-23 * sqrt(D) ~ 3e-5 between them (the reference's gradient on a row over
        # one key is exactly 0, the kernels' that rounding): 1e-3 of the gradients for fp32
        big = scale_t is not None
        _compare_attention_kl(
            inputs,
            causal=causal,
            direction=direction,
            teacher_grad=teacher_grad,
            cu_seqlens=cu,
            scale_t=scale_t,
            scale_s=scale_s,
            val_tol=(1e-4 if big or dtype == torch.float16 else tol),
            grad_tol=(1e-3 if big and dtype == torch.float32 else tol),
            seed=seed,
            floor=0.1,
        )


@st.composite
def group_problems(draw):
    """(q_t [B, N_Q, Hq, D_t], k_t [B, N_K, Hkv, D_t], q_s [B, N_Q, Hkv, D_s], k_s, causal, cu_seqlens or None)."""
    if draw(st.booleans()):
        cu = draw_cu_seqlens(draw, 30).to(DEVICE)
        batch, n_q, n_k = 1, int(cu[-1]), int(cu[-1])
    else:
        batch, n_q, n_k, cu = draw(st.integers(1, 2)), draw(st.integers(1, 56)), draw(st.integers(1, 56)), None
    heads_kv, group = draw(st.integers(1, 2)), draw(st.integers(1, 4))
    dim_t, dim_s = draw(st.sampled_from([16, 24, 32])), draw(st.sampled_from([16, 24, 32]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q_t, k_t, _, _ = make_inputs(batch, n_q, n_k, heads_kv * group, heads_kv, 1, dim_t, 16, dtype, DEVICE, 1.0, gen)
    _, _, q_s, k_s = make_inputs(batch, n_q, n_k, heads_kv, heads_kv, heads_kv, 16, dim_s, dtype, DEVICE, 1.0, gen)
    return q_t, k_t, q_s, k_s, draw(st.booleans()) or cu is not None, cu


@needs_triton
@settings
@hypothesis.given(group_problems(), st.integers(0, 1000))
def test_group_attention_kl_matches_the_reference_on_drawn_problems(problem, seed):
    """group_attention_kl (head-averaged teacher, one student head per KV group): rows, the student's LSE and the
    student's gradients against the float64 reference, errors relative to a floor as in _compare_attention_kl."""
    q_t, k_t, q_s, k_s, causal, cu = problem
    q_s, k_s = q_s.clone().requires_grad_(), k_s.clone().requires_grad_()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSA_BACKEND", "triton")
        out, lse_s = sparsa.group_attention_kl(q_t, k_t, q_s, k_s, causal=causal, reduction="none", cu_seqlens=cu,
                                               return_lse=True)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    out.backward(grad)
    refs = [x.detach().cpu().double() for x in (q_t, k_t, q_s, k_s)]
    refs[2].requires_grad_(), refs[3].requires_grad_()
    ref, ref_lse = naive.group_attention_kl(*refs, causal=causal, scale_t=q_t.shape[-1] ** -0.5,
                                            scale_s=q_s.shape[-1] ** -0.5, cu_seqlens=None if cu is None else cu.cpu())
    ref.backward(grad.cpu().double())
    tol = 2e-5 if q_t.dtype == torch.float32 else 5e-3
    floor = 0.1 * float(grad.double().norm())
    assert rel_err(out, ref, 0.1 * ref.numel() ** 0.5) < (tol if q_t.dtype == torch.float32 else 1e-4)
    assert rel_err(lse_s, ref_lse, ref_lse.numel() ** 0.5) < 1e-5
    assert rel_err(q_s.grad, refs[2].grad, floor) < tol and rel_err(k_s.grad, refs[3].grad, floor) < tol
