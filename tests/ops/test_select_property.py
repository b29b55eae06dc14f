"""Property-based check of the Triton block selection against the reference (SSA, NSA and InfLLM-V2 rules).

Hypothesis draws the sequence length (also shorter than a block), batch, KV heads, any G from 1 to 6, head dim,
block size, top-k, the forced initial and local blocks, the rule (with compression length and stride for the
pooled ones) and fp32 or fp16; the selection must hold the forced blocks, be ascending and -1 right-padded, reach
the reference's selected score mass and equal it wherever the k-th and (k+1)-th scores are clearly apart
(test_select_triton.check_selection). SPARSA_PROPERTY_EXAMPLES raises the number of examples (CI runs a few).
"""

import pytest
import torch

import sparsa
from sparsa.ops.select import naive
from tests.ops.property import hypothesis, needs_triton, settings, st
from tests.ops.test_select_triton import DEVICE, check_selection, reference_scores


@st.composite
def problems(draw):
    block_size = draw(st.sampled_from([8, 16, 32]))
    seqlen = draw(st.integers(1, 160))
    init = draw(st.integers(0, 2))
    local = draw(st.integers(1, 2))
    topk = draw(st.integers(init + local, init + local + 5))
    rule = draw(st.sampled_from(["ssa", "nsa", "infllm"]))
    pooled = {}
    if rule != "ssa":  # compression windows that tile the blocks: stride divides the block, length a stride multiple
        stride = draw(st.sampled_from([s for s in (4, 8, 16) if block_size % s == 0]))
        pooled = dict(score=rule, compress_length=stride * draw(st.integers(1, 2)), compress_stride=stride)
    return dict(
        seqlen=seqlen, batch=draw(st.integers(1, 2)), hkv=draw(st.integers(1, 2)), group=draw(st.integers(1, 6)),
        dim=draw(st.sampled_from([16, 32])), block_size=block_size, topk=topk, init=init, local=local,
        pooled=pooled, dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        gain=draw(st.sampled_from([1.0, 3.0])), seed=draw(st.integers(0, 2**31 - 1)),
    )


@needs_triton
@settings
@hypothesis.given(problems())
def test_selection_matches_the_reference_on_drawn_problems(problem):
    p = problem
    gen = torch.Generator().manual_seed(p["seed"])
    q = p["gain"] * torch.randn(p["batch"], p["seqlen"], p["hkv"] * p["group"], p["dim"], generator=gen)
    k = torch.randn(p["batch"], p["seqlen"], p["hkv"], p["dim"], generator=gen)
    q, k = q.to(p["dtype"]), k.to(p["dtype"])  # the reference sees the same rounded inputs
    scale = p["dim"] ** -0.5
    kw = dict(block_size=p["block_size"], topk=p["topk"], init_blocks=p["init"], local_blocks=p["local"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSA_BACKEND", "triton")
        out = sparsa.select_blocks(q.to(DEVICE), k.to(DEVICE), **kw, **p["pooled"])
    if p["pooled"]:
        length, stride = p["pooled"]["compress_length"], p["pooled"]["compress_stride"]
        reduce = "sum" if p["pooled"]["score"] == "nsa" else "max"
        ref = naive.select_blocks_pooled(q.float(), k.float(), scale=scale, length=length, stride=stride,
                                         reduce=reduce, **kw)
        scores = reference_scores(q, k, p["pooled"]["score"], p["block_size"], scale, length, stride)
    else:
        ref = naive.select_blocks(q.float(), k.float(), scale=scale, **kw)
        scores = reference_scores(q, k, "ssa", p["block_size"], scale)
    forced = naive.forced_mask(p["seqlen"], p["block_size"], p["init"], p["local"], "cpu")
    check_selection(out, ref, scores, forced, p["topk"])
