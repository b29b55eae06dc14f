"""SPARSA_KV_OVERLAP: the KV-outer forward and backward cut into head chunks (overlap.py).

On CPU the chunks run one after the other in the interpreter (no streams); on a GPU the reductions run on the
side stream. Either way every output and gradient must equal the float64 reference."""

import pytest
import torch

from sparsa.ops import _alloc as alloc_mod
from sparsa.ops.sparse_attn import overlap
from sparsa.ops.sparse_attn.index import build_pair_index, doc_meta, random_selection
from tests.ops.test_sparse_attn_triton import CUDA, DEVICE, INTERP, check, make_inputs

pytestmark = pytest.mark.skipif(not (CUDA or INTERP), reason="needs a GPU or the Triton interpreter")


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("SPARSA_BACKEND", "triton")
    monkeypatch.setattr(alloc_mod, "POISON_OUTPUTS", True)


def _group_tokens(index, group):
    start, count = int(index.gstart[group]), int(index.counts[group])
    return index.toks[start : start + count].tolist()


def test_head_range_is_the_index_of_those_heads():
    """A chunk's groups list the same tokens as an index built for its heads alone, and its pos points at
    the same tokens in the shared sorted list; a range outside the slice is a ValueError."""
    n_tokens, hkv, topk, bs = 64, 5, 3, 16
    idx = random_selection(1, n_tokens, hkv, topk, bs, generator=torch.Generator().manual_seed(3), device=DEVICE)
    idx = idx.reshape(n_tokens, hkv, topk).to(torch.int32).contiguous()
    meta = doc_meta(1, n_tokens, None, bs, idx.device)
    whole = build_pair_index(idx, meta, bs, 1, 4)  # heads 1..4
    chunk = whole.head_range(1, 3)  # heads 2, 3
    alone = build_pair_index(idx, meta, bs, 2, 2)
    assert (chunk.h0, chunk.n_heads, chunk.n_pairs_max) == (2, 2, alone.n_pairs_max)
    assert chunk.counts.numel() == alone.counts.numel()
    for g in range(alone.counts.numel()):
        assert _group_tokens(chunk, g) == _group_tokens(alone, g)
    valid = alone.pos >= 0
    assert torch.equal(valid, chunk.pos >= 0)
    assert torch.equal(whole.toks[chunk.pos[valid].long()], alone.toks[alone.pos[valid].long()])
    for first, end in ((0, 0), (3, 5), (-1, 2)):
        with pytest.raises(ValueError, match="head range"):
            whole.head_range(first, end)


def test_head_chunks():
    """At most MAX_CHUNKS chunks of whole heads covering the slice in order; one chunk when off."""
    n_tokens, topk, bs = 32, 2, 16
    idx = random_selection(1, n_tokens, 7, topk, bs, generator=torch.Generator().manual_seed(1), device=DEVICE)
    idx = idx.reshape(n_tokens, 7, topk).to(torch.int32).contiguous()
    index = build_pair_index(idx, doc_meta(1, n_tokens, None, bs, idx.device), bs, 0, 7)
    assert overlap.head_chunks(index, False) == [index]
    chunks = overlap.head_chunks(index, True)
    assert [(c.h0, c.n_heads) for c in chunks] == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1)]
    old = overlap.MAX_CHUNKS
    try:
        overlap.MAX_CHUNKS = 3
        assert [(c.h0, c.n_heads) for c in overlap.head_chunks(index, True)] == [(0, 3), (3, 3), (6, 1)]
    finally:
        overlap.MAX_CHUNKS = old


@pytest.mark.parametrize("local", ["0", "1"])
def test_kv_outer_in_head_chunks_matches_the_reference(local, monkeypatch):
    """Forward (with and without the fused local blocks) and backward in chunks of 2 heads over 5 KV heads (the
    last chunk short), packed documents, split dK/dV groups (one row tile per item), two head slices."""
    from sparsa.ops.sparse_attn import backward as bwd_mod
    from sparsa.ops.sparse_attn import triton_ops

    monkeypatch.setenv("SPARSA_KV_OVERLAP", "1")
    monkeypatch.setenv("SPARSA_KV_LOCAL", local)
    monkeypatch.setattr(overlap, "MAX_CHUNKS", 3)
    monkeypatch.setattr(bwd_mod, "MAX_PAIRS_PER_ITEM", 1)
    cu = torch.tensor([0, 29, 64], dtype=torch.int32, device=DEVICE)
    q, k, v, do = make_inputs(1, 64, 5, 2, 16, torch.float32, seed=80)
    idx = random_selection(1, 64, 5, 3, 16, cu_seqlens=cu.cpu(), generator=torch.Generator().manual_seed(80), device=DEVICE)
    check(q, k, v, do, idx, 16, cu_seqlens=cu, orders=("kv_outer",))
    # two slices (heads 0-2 and 3-4 with a per-slice buffer of 3 heads), each cut into chunks
    per_head = 64 * 3 * 2 * (16 * 4 + 4)
    monkeypatch.setattr(triton_ops, "PAIR_BUFFER_BYTES", 3 * per_head)
    assert triton_ops._head_slices(5, 64, 3, 2, 16, 16) == [(0, 3), (3, 2)]
    check(q, k, v, do, idx, 16, cu_seqlens=cu, orders=("kv_outer",))


def test_kv_outer_in_head_chunks_fp16_large_logits(monkeypatch):
    """fp16, |q.k| ~ 50, G = 3, Dv != D, one head per chunk."""
    monkeypatch.setenv("SPARSA_KV_OVERLAP", "1")
    q, k, v, do = make_inputs(1, 96, 3, 3, 16, torch.float16, dim_v=32, logit=50.0, seed=81)
    idx = random_selection(1, 96, 3, 4, 16, generator=torch.Generator().manual_seed(81), device=DEVICE)
    check(q, k, v, do, idx, 16, orders=("kv_outer",), tol=1e-2)


def test_overlap_switch_rejects_other_values(monkeypatch):
    monkeypatch.setenv("SPARSA_KV_OVERLAP", "yes")
    with pytest.raises(ValueError, match="SPARSA_KV_OVERLAP"):
        overlap.enabled()
