"""Property-based check of the Triton selected-block attention against the float64 reference.

Hypothesis draws the whole problem: batch or packed documents, KV heads, any G from 1 to 6, head dims
(also below their tile), block size, top-k and a selection that may hold duplicates, -1 anywhere, blocks
out of order and blocks after the query's own (the reference treats a row as a set of blocks and drops
keys after the query). Every loop order must match outputs, LSE and the gradients of q, k and v.
SPARSA_PROPERTY_EXAMPLES raises the number of examples (CI runs a few; a bug hunt runs hundreds).
"""

import torch

from tests.ops.property import draw_cu_seqlens, hypothesis, settings, st
from tests.ops.test_sparse_attn_triton import _triton_backend, pytestmark, DEVICE, check, make_inputs  # noqa: F401


@st.composite
def problems(draw):
    """(seqlen, batch, cu_seqlens or None, hkv, group, dim, dim_v, block_size, selection [B, T, Hkv, topk])."""
    block_size = draw(st.sampled_from([16, 32]))
    packed = draw(st.booleans())
    if packed:
        cu = draw_cu_seqlens(draw, 40)
        seqlen, batch = int(cu[-1]), 1
    else:
        seqlen, batch, cu = draw(st.integers(1, 72)), draw(st.integers(1, 2)), None
    hkv = draw(st.integers(1, 2))
    group = draw(st.integers(1, 6))
    dim = draw(st.sampled_from([16, 24, 32]))
    dim_v = draw(st.sampled_from([dim, 16, 40]))
    topk = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    spans = [(0, seqlen)] if cu is None else list(zip(cu.tolist()[:-1], cu.tolist()[1:]))
    idx = torch.full((batch, seqlen, hkv, topk), -1, dtype=torch.int32)
    style = draw(st.sampled_from(["own_and_random", "anything"]))
    for s, e in spans:
        n_blocks = -(-(e - s) // block_size)  # blocks of this document (indices are local to it)
        cur = torch.arange(e - s) // block_size  # [n]
        rand = torch.randint(-1, n_blocks, (batch, e - s, hkv, topk), generator=gen, dtype=torch.int32)
        if style == "own_and_random":  # the own block first, then any past or padding entries
            rand = torch.minimum(rand, cur[None, :, None, None].int())
            rand[..., 0] = cur[None, :, None].int()
        idx[:, s:e] = rand
    return seqlen, batch, cu, hkv, group, dim, dim_v, block_size, idx, seed


@settings
@hypothesis.given(problems(), st.sampled_from([torch.float32, torch.float16]))
def test_every_order_matches_the_reference_on_drawn_problems(problem, dtype):
    seqlen, batch, cu, hkv, group, dim, dim_v, block_size, idx, seed = problem
    q, k, v, do = make_inputs(batch, seqlen, hkv, group, dim, dtype, dim_v=dim_v, seed=seed)
    cu = None if cu is None else cu.to(DEVICE)
    check(q, k, v, do, idx.to(DEVICE), block_size, cu_seqlens=cu, tol=2e-5 if dtype == torch.float32 else 1e-2,
          grad_floor=0.1)
