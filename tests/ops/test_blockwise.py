"""The memory-bounded PyTorch path (blockwise.py) against the dense reference (naive.py), float64 on CPU."""
import pytest
import torch

from sparsa.ops import _alloc
from sparsa.ops.sparse_attn import blockwise, naive, sparse_attention


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make(batch, seqlen, hq, hkv, d, dv, block, topk, seed, max_block=None, logit_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, seqlen, hq, d, generator=g, dtype=torch.float64) * logit_scale).requires_grad_()
    k = torch.randn(batch, seqlen, hkv, d, generator=g, dtype=torch.float64).requires_grad_()
    v = torch.randn(batch, seqlen, hkv, dv, generator=g, dtype=torch.float64).requires_grad_()
    n_blocks = max_block if max_block is not None else -(-seqlen // block)
    idx = torch.randint(-1, n_blocks, (batch, seqlen, hkv, topk), generator=g)
    return q, k, v, idx


def check_against_reference(q, k, v, idx, block, scale, cu_seqlens=None, tol=1e-12):
    o_ref, lse_ref = naive.sparse_attention(q, k, v, idx, block_size=block, scale=scale, cu_seqlens=cu_seqlens)
    o, lse = blockwise.sparse_attention(q, k, v, idx, block_size=block, scale=scale, cu_seqlens=cu_seqlens)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    finite = torch.isfinite(lse_ref)
    assert (lse[finite] - lse_ref[finite]).abs().max().item() < tol * 10
    assert rel(o, o_ref) < tol
    grad_out = torch.randn_like(o_ref)
    want = torch.autograd.grad(o_ref, (q, k, v), grad_out)
    got = torch.autograd.grad(o, (q, k, v), grad_out)
    for name, a, b in zip("qkv", got, want):
        assert not torch.isnan(a).any(), f"d{name} has NaN"
        assert rel(a, b) < tol, f"d{name}: relative error {rel(a, b):.2e}"


@pytest.fixture(autouse=True)
def poisoned_small_chunks(monkeypatch):
    """Several chunks per document (a few hundred elements each) and NaN-filled outputs."""
    monkeypatch.setattr(blockwise, "CHUNK_ELEMENTS", 4000)
    monkeypatch.setattr(_alloc, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("hq, hkv", [(6, 2), (3, 1), (4, 4), (5, 1)])
def test_matches_reference_across_groups(hq, hkv):
    q, k, v, idx = make(2, 150, hq, hkv, 16, 12, 16, 5, seed=hq * 10 + hkv)
    check_against_reference(q, k, v, idx, 16, 0.3)


def test_repeated_blocks_count_once_and_padding_is_ignored():
    q, k, v, idx = make(1, 130, 4, 2, 8, 8, 32, 4, seed=1)
    idx[..., 1] = idx[..., 0]  # every token lists a block twice
    idx[:, ::3, :, 2:] = -1  # and some lists end early
    check_against_reference(q, k, v, idx, 32, 0.5)
    blocks = blockwise.unique_selection(torch.tensor([[3, 3, -1, 0, 3, 0, -5]]))
    assert blocks.tolist() == [[3, -1, -1, 0, -1, -1, -1]]


def test_rows_without_keys_give_zero_output_and_minus_inf_lse():
    q, k, v, idx = make(1, 80, 2, 1, 8, 8, 16, 3, seed=2)
    idx[:, :40] = -1  # no selection at all
    idx[:, 40:60] = 4  # only a future block: every key is past the token
    check_against_reference(q, k, v, idx, 16, 0.4)
    o, lse = blockwise.sparse_attention(q, k, v, idx, block_size=16, scale=0.4)
    assert torch.all(o[:, :60] == 0) and torch.all(torch.isneginf(lse[:, :60]))


def test_packed_documents_use_local_positions():
    cu = torch.tensor([0, 70, 71, 200])
    q, k, v, idx = make(1, 200, 4, 2, 8, 8, 16, 4, seed=3, max_block=5)
    idx[:, 70] = 0  # the one-token document
    check_against_reference(q, k, v, idx, 16, 0.35, cu_seqlens=cu)


def test_blocks_past_a_packed_document_select_nothing():
    cu = torch.tensor([0, 40, 100])
    q, k, v, idx = make(1, 100, 4, 2, 8, 8, 16, 3, seed=8, max_block=3)
    far = idx.clone()
    far[:, 40:, :, 0] = 6  # block 6 of a 60-token document (4 blocks) holds no key: same as no selection
    near = idx.clone()
    near[:, 40:, :, 0] = -1
    o_far, lse_far = blockwise.sparse_attention(q, k, v, far, block_size=16, scale=0.3, cu_seqlens=cu)
    o_near, lse_near = blockwise.sparse_attention(q, k, v, near, block_size=16, scale=0.3, cu_seqlens=cu)
    assert torch.equal(o_far, o_near) and torch.equal(lse_far, lse_near)
    grads = [torch.autograd.grad(o.sum(), (q, k, v)) for o in (o_far, o_near)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_large_logits_stay_finite():
    q, k, v, idx = make(1, 96, 4, 1, 16, 16, 16, 4, seed=4, logit_scale=40.0)  # |q.k| up to several hundred
    check_against_reference(q, k, v, idx, 16, 1.0, tol=1e-10)


def test_every_token_on_block_zero_only():
    q, k, v, idx = make(1, 100, 4, 2, 8, 8, 16, 3, seed=5)
    idx.fill_(-1)
    idx[..., 0] = 0
    check_against_reference(q, k, v, idx, 16, 0.3)


def test_low_precision_inputs_accumulate_in_float32():
    q, k, v, idx = make(1, 120, 4, 2, 16, 16, 16, 4, seed=6)
    o_ref, lse_ref = naive.sparse_attention(q, k, v, idx, block_size=16, scale=0.25)
    for dtype in (torch.float32, torch.bfloat16):
        o, lse = blockwise.sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), idx, block_size=16, scale=0.25)
        assert o.dtype == dtype and lse.dtype == torch.float32
        assert rel(o.double(), o_ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_public_op_dispatches_long_sequences_to_blockwise(monkeypatch):
    q, k, v, idx = make(1, 200, 4, 2, 8, 8, 16, 2, seed=7)
    monkeypatch.setattr(blockwise, "DENSE_SMALL_ELEMENTS", 0)
    assert not blockwise.prefers_dense(q, idx, 16)  # 200 tokens >= 4 x 32 selected keys
    assert blockwise.prefers_dense(q[:, :100], idx[:, :100], 16)
    calls = []
    monkeypatch.setattr(blockwise, "_BlockwiseSparseAttention", type("Spy", (), {
        "apply": staticmethod(lambda *a: calls.append(1) or naive.sparse_attention(
            *a[:4], block_size=a[4], scale=a[5], cu_seqlens=a[6]))}))
    monkeypatch.setenv("SPARSA_BACKEND", "naive")
    sparse_attention(q, k, v, idx, block_size=16)
    assert calls == [1]
    sparse_attention(q[:, :100], k[:, :100], v[:, :100], idx[:, :100].clamp(max=6), block_size=16)
    assert calls == [1]


def test_chunk_memory_is_bounded(monkeypatch):
    monkeypatch.setattr(blockwise, "CHUNK_ELEMENTS", 2**24)
    per_token = 8 * 1024 * (128 + 128 + 3 * 4)  # KV heads x keys x (key + value + 3 logits per query head)
    tokens = blockwise.chunk_tokens(1, 8, 4, 16 * 64, 128, 128)
    assert tokens * per_token <= 2**24 < (tokens + 1) * per_token
    monkeypatch.setattr(blockwise, "CHUNK_ELEMENTS", 1)
    assert blockwise.chunk_tokens(2, 8, 4, 1024, 128, 128) == 1
