"""Property-based check of the Triton compressed attention (NSA's compression branch) against the float64 reference.

Hypothesis draws batch or packed documents (also shorter than one window), the compression window and stride, KV
heads, G from 1 to 4, head dims, fp32 or fp16 and peaked queries; outputs, LSE and the gradients of q and the
compressed keys and values must match. A gradient's error is relative to at least 0.1 of the upstream gradient's
norm: a query that sees one compressed key has dq = 0 exactly. SPARSA_PROPERTY_EXAMPLES raises the number of
examples (CI runs a few).
"""

import pytest
import torch

from sparsa.ops.compress import compressed_cu_seqlens, n_compressed
from tests.helpers import rel_err
from tests.ops.property import draw_cu_seqlens, hypothesis, needs_triton, settings, st
from tests.ops.test_compress import DEVICE, TOL, run_both


@st.composite
def problems(draw):
    stride = draw(st.sampled_from([4, 8]))
    length = stride * draw(st.integers(1, 2))
    if draw(st.booleans()):
        cu = draw_cu_seqlens(draw, 40)
        batch, seqlen = 1, int(cu[-1])
        n_c = int(compressed_cu_seqlens(cu, length, stride)[-1])
    else:
        batch, seqlen, cu = draw(st.integers(1, 2)), draw(st.integers(1, 90)), None
        n_c = n_compressed(seqlen, length, stride)
    return dict(
        batch=batch, seqlen=seqlen, cu=cu, n_c=n_c, length=length, stride=stride, hkv=draw(st.integers(1, 2)),
        group=draw(st.integers(1, 4)), dim=draw(st.sampled_from([16, 32])), dv=draw(st.sampled_from([16, 24])),
        dtype=draw(st.sampled_from([torch.float32, torch.float16])), gain=draw(st.sampled_from([1.0, 4.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@needs_triton
@settings
@hypothesis.given(problems())
def test_compressed_attention_matches_the_reference_on_drawn_problems(problem):
    p = problem
    gen = torch.Generator().manual_seed(p["seed"])
    q = p["gain"] * torch.randn(p["batch"], p["seqlen"], p["hkv"] * p["group"], p["dim"], generator=gen)
    kc = torch.randn(p["batch"], p["n_c"], p["hkv"], p["dim"], generator=gen)
    vc = torch.randn(p["batch"], p["n_c"], p["hkv"], p["dv"], generator=gen)
    q, kc, vc = (x.to(DEVICE, p["dtype"]) for x in (q, kc, vc))
    cu = None if p["cu"] is None else p["cu"].to(DEVICE)
    torch.manual_seed(p["seed"])  # run_both draws the upstream gradient
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSA_BACKEND", "triton")
        (out, lse, grads), (ref_out, ref_lse, ref_grads) = run_both(q, kc, vc, p["length"], p["stride"], cu=cu)
    tol = TOL[p["dtype"]] * (4 if p["gain"] > 1 else 1)  # peaked rows: fp32 rounding of exp grows with |logit|
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)  # NaN-poisoned buffers
    assert rel_err(out, ref_out) < tol
    lse, ref_lse = lse.detach().cpu().double(), ref_lse.detach()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    if finite.any():
        assert float((lse[finite] - ref_lse[finite]).abs().max()) < 20 * tol
    floor = 0.1 * float(ref_out.numel() ** 0.5)  # the upstream gradient is standard normal: ||dO|| ~ sqrt(numel)
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg, floor) < 4 * tol
