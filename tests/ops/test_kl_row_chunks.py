"""Attention KL in chunks of query rows (row_chunks.py) against the one-piece reference, float64 on CPU."""
import pytest
import torch

from sparsa.ops.kl import attention_kl, group_attention_kl, naive, row_chunks
from tests.helpers import rel_err


def sides(n_q, n_k, heads, t_kv, s_heads, s_kv, seed, logit_scale=1.0):
    """Teacher q [2, n_q, heads, 8], k [2, n_k, t_kv, 8]; student q [2, n_q, s_heads, 6], k [2, n_k, s_kv, 6]."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return (torch.randn(*shape, dtype=torch.float64, generator=gen) * logit_scale).requires_grad_()

    return leaf(2, n_q, heads, 8), leaf(2, n_k, t_kv, 8), leaf(2, n_q, s_heads, 6), leaf(2, n_k, s_kv, 6)


def grads(out, leaves, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.autograd.grad((out * torch.randn(out.shape, dtype=out.dtype, generator=gen)).sum(), leaves)


@pytest.mark.parametrize("n_q, n_k, causal, direction", [(37, 37, True, "forward"), (20, 45, True, "reverse"),
                                                        (45, 20, True, "forward"), (30, 33, False, "forward")])
def test_attention_kl_in_row_chunks_matches_reference(monkeypatch, n_q, n_k, causal, direction):
    q_t, k_t, q_s, k_s = sides(n_q, n_k, 6, 2, 6, 3, seed=n_q + n_k, logit_scale=3.0)
    kwargs = dict(causal=causal, scale_t=0.4, scale_s=0.5, direction=direction)
    want = naive.attention_kl(q_t, k_t, q_s, k_s, **kwargs)
    monkeypatch.setattr(row_chunks, "CHUNK_ELEMENTS", 2 * 2 * 6 * n_k * 4)  # 4 rows per chunk
    assert row_chunks.chunk_rows(2, 6, n_k) == 4
    got = row_chunks.attention_kl(q_t, k_t, q_s, k_s, **kwargs)
    for a, b in zip(got, want):
        assert not torch.isnan(a).any()
        assert (a - b).abs().max().item() < 1e-12
    leaves = (q_t, k_t, q_s, k_s)
    for a, b in zip(grads(got[0], leaves, 1), grads(want[0], leaves, 1)):
        assert rel_err(a, b) < 1e-12


def test_group_kl_in_row_chunks_with_packed_documents(monkeypatch):
    q_t, k_t, q_s, k_s = sides(50, 50, 6, 2, 2, 2, seed=3)
    cu = torch.tensor([0, 17, 18, 50], dtype=torch.int32)
    want = naive.group_attention_kl(q_t[:1], k_t[:1], q_s[:1], k_s[:1], causal=True, scale_t=0.4, scale_s=0.5,
                                    cu_seqlens=cu)
    monkeypatch.setattr(row_chunks, "CHUNK_ELEMENTS", 600)
    got = row_chunks.group_attention_kl(q_t[:1], k_t[:1], q_s[:1], k_s[:1], causal=True, scale_t=0.4, scale_s=0.5,
                                        cu_seqlens=cu)
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() < 1e-12
    leaves = (q_s, k_s)
    for a, b in zip(grads(got[0], leaves, 2), grads(want[0], leaves, 2)):
        assert rel_err(a, b) < 1e-12


def test_public_ops_take_the_chunked_path_on_cpu(monkeypatch):
    q_t, k_t, q_s, k_s = sides(24, 24, 4, 4, 4, 4, seed=4)
    monkeypatch.setenv("SPARSA_BACKEND", "naive")
    whole = attention_kl(q_t, k_t, q_s, k_s, reduction="none")
    g_whole = torch.autograd.grad(whole.sum(), (q_s, k_s))
    monkeypatch.setattr(row_chunks, "CHUNK_ELEMENTS", 2 * 2 * 4 * 24 * 5)  # 5 rows per chunk
    calls = []
    dense = naive.attention_kl_dense
    monkeypatch.setattr(naive, "attention_kl_dense", lambda *a, **k: calls.append(a[0].shape[1]) or dense(*a, **k))
    chunked = attention_kl(q_t, k_t, q_s, k_s, reduction="none")
    assert calls[:5] == [5, 5, 5, 5, 4]
    assert (chunked - whole).abs().max().item() < 1e-12
    for a, b in zip(torch.autograd.grad(chunked.sum(), (q_s, k_s)), g_whole):
        assert rel_err(a, b) < 1e-12
    loss = group_attention_kl(q_t, k_t[:, :, :2], q_s[:, :, :2], k_s[:, :, :2])
    assert torch.isfinite(loss)
