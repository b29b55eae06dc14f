"""Sliding-window attention: Triton forward/backward against the float64 reference."""
import pytest
import torch

from sparsa.ops.full_attention import attention_reference
from sparsa.ops.window import naive, window_attention
from tests.helpers import rel_err as rel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def compare(q, k, v, window, dtype, cu=None):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out, lse = window_attention(*leaves, window=window, cu_seqlens=cu, return_lse=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [x.detach().double().cpu().requires_grad_(True) for x in (q, k, v)]
    ref_out, ref_lse = naive.window_attention(*ref_leaves, window=window, scale=q.shape[-1] ** -0.5,
                                              cu_seqlens=None if cu is None else cu.cpu())
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, dout.double().cpu())
    tol = TOL[dtype]
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert rel(out.cpu(), ref_out) < tol
    assert float((lse.cpu().double() - ref_lse).abs().max()) < 20 * tol
    for g, rg in zip(grads, ref_grads):
        assert rel(g.cpu(), rg) < 4 * tol
    return out


@pytest.mark.parametrize("dtype,batch,group,window", [(torch.float32, 2, 3, 24), (torch.float16, 1, 1, 40)]
                         + ([(torch.bfloat16, 2, 8, 64)] if DEVICE == "cuda" else []))
def test_window_matches_reference(triton_backend, dtype, batch, group, window):
    torch.manual_seed(0)
    seqlen, n_kv, dim = 100, 2, 16
    q = torch.randn(batch, seqlen, n_kv * group, dim, device=DEVICE, dtype=dtype)
    k = torch.randn(batch, seqlen, n_kv, dim, device=DEVICE, dtype=dtype)
    v = torch.randn(batch, seqlen, n_kv, 24, device=DEVICE, dtype=dtype)
    compare(q, k, v, window, dtype)


def test_window_large_logits_and_limits(triton_backend):
    torch.manual_seed(1)
    q = 30 * torch.randn(1, 70, 2, 16, device=DEVICE)
    k = torch.randn(1, 70, 1, 16, device=DEVICE)
    v = torch.randn(1, 70, 1, 16, device=DEVICE)
    compare(q, k, v, 17, torch.float32)
    # window 1: every query sees only itself
    out = window_attention(q, k, v, window=1)
    assert torch.allclose(out, v.expand_as(out), atol=1e-6)
    # a window covering the sequence is causal attention
    full = window_attention(q[:, :40], k[:, :40], v[:, :40], window=64)
    ref = attention_reference(q[:, :40].cpu(), k[:, :40].cpu(), v[:, :40].cpu(), causal=True, scale=0.25)[0]
    assert rel(full.cpu(), ref) < 1e-4


def test_window_packed_documents(triton_backend):
    torch.manual_seed(2)
    cu = torch.tensor([0, 30, 33, 90], dtype=torch.int32, device=DEVICE)
    q = torch.randn(1, 90, 4, 16, device=DEVICE)
    k = torch.randn(1, 90, 2, 16, device=DEVICE)
    v = torch.randn(1, 90, 2, 16, device=DEVICE)
    out = compare(q, k, v, 20, torch.float32, cu=cu)
    alone = window_attention(q[:, 33:], k[:, 33:], v[:, 33:], window=20)
    assert rel(out[:, 33:].cpu(), alone.cpu()) < 1e-5


def test_window_validation():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="window"):
        window_attention(q, q[:, :, :1], q[:, :, :1], window=0)


@pytest.mark.parametrize("window, rows, cu", [(5, 8, None), (16, 16, None), (1, 4, None), (7, 10, [0, 37, 38, 90]),
                                           (200, 16, None)])
def test_chunked_cpu_path_matches_reference(monkeypatch, window, rows, cu):
    from sparsa.ops.compress import chunked

    monkeypatch.setattr(chunked, "MIN_ROWS", rows)
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 1)  # MIN_ROWS rows per chunk
    gen = torch.Generator().manual_seed(window * 100 + rows)
    q = torch.randn(2 if cu is None else 1, 90, 6, 8, dtype=torch.float64, generator=gen) * 4
    k = torch.randn(q.shape[0], 90, 2, 8, dtype=torch.float64, generator=gen)
    v = torch.randn(q.shape[0], 90, 2, 5, dtype=torch.float64, generator=gen)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    ref_leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out, lse = naive.window_attention(*leaves, window=window, scale=0.3, cu_seqlens=cu,
                                      attend=chunked.chunked_positional_attention)
    ref_out, ref_lse = naive.window_attention(*ref_leaves, window=window, scale=0.3, cu_seqlens=cu)
    assert rel(out, ref_out) < 1e-13 and float((lse - ref_lse).detach().abs().max()) < 1e-12
    dout = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, leaves, dout), torch.autograd.grad(ref_out, ref_leaves, dout)):
        assert rel(g, r) < 1e-12


def test_long_sequences_take_the_chunked_path(monkeypatch):
    from sparsa.ops.compress import chunked

    monkeypatch.setenv("SPARSA_BACKEND", "naive")
    q = torch.zeros(1, 2048, 8, 16)
    assert not chunked.prefers_dense(q, 2048)  # 32M dense logits
    assert chunked.prefers_dense(q[:, :512], 512)  # 2M
    calls = []
    real = chunked.chunked_positional_attention
    monkeypatch.setattr(chunked, "chunked_positional_attention", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    window_attention(q[:, :1100], q[:, :1100, :2], q[:, :1100, :2], window=64)
    assert calls == [(1, 1100, 8, 16)]
