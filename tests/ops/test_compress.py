"""NSA compression branch: pooling / MLP compression and the Triton compressed attention vs the reference."""
import pytest
import torch

from sparsa.ops.compress import (
    compressed_attention,
    compressed_cu_seqlens,
    mean_pool,
    mlp_compress,
    n_compressed,
    naive,
)
from tests.helpers import rel_err as rel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def run_both(q, kc, vc, length, stride, cu=None, scale=None):
    """Triton (via the public op) and float64 reference: outputs, lse and gradients."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, kc, vc)]
    out, lse = compressed_attention(*leaves, length=length, stride=stride, cu_seqlens=cu, scale=scale,
                                    return_lse=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [x.detach().double().cpu().requires_grad_(True) for x in (q, kc, vc)]
    ref_out, ref_lse = naive.compressed_attention(*ref_leaves, length=length, stride=stride,
                                                  scale=scale or q.shape[-1] ** -0.5,
                                                  cu_seqlens=None if cu is None else cu.cpu())
    # materialize: with no compressed key at all the reference's graph does not reach kc / vc (zero gradients)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, dout.double().cpu(), allow_unused=True,
                                    materialize_grads=True)
    return (out, lse, grads), (ref_out, ref_lse, ref_grads)


def check(result, reference, dtype):
    (out, lse, grads), (ref_out, ref_lse, ref_grads) = result, reference
    tol = TOL[dtype]
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)  # NaN-poisoned buffers
    assert rel(out.cpu(), ref_out) < tol
    lse = lse.cpu()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert float((lse[finite].detach().double() - ref_lse[finite].detach()).abs().max()) < 20 * tol
    for g, rg in zip(grads, ref_grads):
        assert rel(g.cpu(), rg) < 4 * tol


@pytest.mark.parametrize("dtype,batch,group,dv", [(torch.float32, 2, 3, 24), (torch.float16, 1, 2, 16)]
                         + ([(torch.bfloat16, 2, 4, 32)] if DEVICE == "cuda" else []))
def test_compressed_attention_matches_reference(triton_backend, dtype, batch, group, dv):
    torch.manual_seed(0)
    seqlen, n_kv, dim, length, stride = 90, 2, 16, 16, 8
    n_c = n_compressed(seqlen, length, stride)
    q = torch.randn(batch, seqlen, n_kv * group, dim, device=DEVICE, dtype=dtype)
    kc = torch.randn(batch, n_c, n_kv, dim, device=DEVICE, dtype=dtype)
    vc = torch.randn(batch, n_c, n_kv, dv, device=DEVICE, dtype=dtype)
    result, reference = run_both(q, kc, vc, length, stride)
    check(result, reference, dtype)
    assert float(result[0][:, : length - 1].abs().max()) == 0.0  # nothing visible before the first window ends


def test_compressed_attention_large_logits(triton_backend):
    torch.manual_seed(1)
    seqlen, dim, length, stride = 80, 16, 8, 4
    n_c = n_compressed(seqlen, length, stride)
    q = 30 * torch.randn(1, seqlen, 2, dim, device=DEVICE)
    kc = torch.randn(1, n_c, 1, dim, device=DEVICE)
    vc = torch.randn(1, n_c, 1, dim, device=DEVICE)
    result, reference = run_both(q, kc, vc, length, stride)
    check(result, reference, torch.float32)


def test_compressed_attention_packed_documents(triton_backend):
    torch.manual_seed(2)
    lengths = [40, 7, 53]  # the middle document has no complete window
    length, stride, dim = 8, 4, 16
    cu = torch.tensor([0, 40, 47, 100], dtype=torch.int32, device=DEVICE)
    ccu = compressed_cu_seqlens(cu, length, stride)
    assert ccu.tolist() == [0, n_compressed(40, 8, 4), n_compressed(40, 8, 4), n_compressed(40, 8, 4) + n_compressed(53, 8, 4)]
    q = torch.randn(1, sum(lengths), 4, dim, device=DEVICE)
    kc = torch.randn(1, int(ccu[-1]), 2, dim, device=DEVICE)
    vc = torch.randn(1, int(ccu[-1]), 2, dim, device=DEVICE)
    result, reference = run_both(q, kc, vc, length, stride, cu=cu)
    check(result, reference, torch.float32)
    # each document alone gives the same output
    o_doc, _ = naive.compressed_attention(q[:, 47:].cpu(), kc[:, int(ccu[2]):].cpu(), vc[:, int(ccu[2]):].cpu(),
                                          length=length, stride=stride, scale=dim ** -0.5)
    assert rel(result[0][:, 47:].cpu(), o_doc) < 1e-4


def test_compressed_attention_no_window(triton_backend):
    """T < length: no compressed token at all -> zeros, lse -inf, zero gradients, no NaN."""
    q = torch.randn(1, 5, 2, 16, device=DEVICE, requires_grad=True)
    kc = torch.zeros(1, 0, 1, 16, device=DEVICE, requires_grad=True)
    out, lse = compressed_attention(q, kc, kc, length=8, stride=4, return_lse=True)
    assert float(out.abs().max()) == 0.0 and bool(torch.isinf(lse).all())
    out.sum().backward()
    assert float(q.grad.abs().max()) == 0.0


def test_mean_pool_and_mlp_compress():
    torch.manual_seed(3)
    x = torch.randn(2, 37, 3, 8, dtype=torch.float64)
    length, stride = 8, 4
    n_c = n_compressed(37, length, stride)
    pooled = mean_pool(x, length=length, stride=stride)
    explicit = torch.stack([x[:, i * stride: i * stride + length].mean(1) for i in range(n_c)], dim=1)
    assert torch.allclose(pooled, explicit)
    # the MLP initialised to (1/length) * stacked identities is mean pooling; the position embedding adds its mean
    weight = (torch.eye(8, dtype=torch.float64).repeat(length, 1) / length).expand(3, -1, -1).contiguous()
    pos = torch.randn(3, length, 8, dtype=torch.float64)
    assert torch.allclose(mlp_compress(x, weight, None, length=length, stride=stride), explicit)
    with_pos = mlp_compress(x, weight, pos, length=length, stride=stride)
    assert torch.allclose(with_pos, explicit + pos.mean(1))
    # gradients reach the weight and the position embedding
    weight.requires_grad_(True)
    pos.requires_grad_(True)
    mlp_compress(x, weight, pos, length=length, stride=stride).square().sum().backward()
    assert weight.grad is not None and pos.grad is not None
    # packed documents: pooling restarts at each document
    cu = torch.tensor([0, 20, 37], dtype=torch.int32)
    packed = mean_pool(x[:1], length=length, stride=stride, cu_seqlens=cu)
    alone = torch.cat([mean_pool(x[:1, :20], length=length, stride=stride),
                       mean_pool(x[:1, 20:], length=length, stride=stride)], dim=1)
    assert torch.allclose(packed, alone)


def test_compress_validation():
    q = torch.randn(1, 32, 2, 16)
    kc = torch.randn(1, 4, 1, 16)  # 32 tokens hold 3 windows of 16 with stride 8
    with pytest.raises(ValueError, match="expected"):
        compressed_attention(q, kc, kc, length=16, stride=8)
    with pytest.raises(ValueError, match="stride"):
        compressed_attention(q, kc, kc, length=16, stride=0)
    with pytest.raises(ValueError, match="weight"):
        mlp_compress(q, torch.zeros(2, 10, 16), length=8, stride=4)


def test_compressed_attention_split_dkv(triton_backend, monkeypatch):
    """dK/dV with the queries split into segments that add into fp32 buffers (atomics)."""
    from sparsa.ops.compress import triton_attention

    monkeypatch.setattr(triton_attention, "FORCE_SPLIT_ON_CPU", True)
    monkeypatch.setattr(triton_attention, "DKV_ITERATIONS", 1)  # one (query tile, head) step per segment
    torch.manual_seed(4)
    seqlen, dim, length, stride = 150, 16, 8, 4
    n_c = n_compressed(seqlen, length, stride)
    q = torch.randn(1, seqlen, 2, dim, device=DEVICE)
    kc = torch.randn(1, n_c, 1, dim, device=DEVICE)
    vc = torch.randn(1, n_c, 1, dim, device=DEVICE)
    result, reference = run_both(q, kc, vc, length, stride)
    check(result, reference, torch.float32)


@pytest.mark.parametrize("rows, cu", [(8, None), (5, [0, 40, 47, 100]), (64, None)])
def test_compressed_attention_in_query_chunks_matches_reference(monkeypatch, rows, cu):
    from sparsa.ops.compress import chunked

    monkeypatch.setattr(chunked, "MIN_ROWS", rows)
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 1)  # MIN_ROWS rows per chunk
    length, stride = 8, 4
    gen = torch.Generator().manual_seed(rows)
    batch = 2 if cu is None else 1
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    n_keys = n_compressed(100, length, stride) if cu is None else int(compressed_cu_seqlens(cu, length, stride)[-1])
    q = torch.randn(batch, 100, 6, 8, dtype=torch.float64, generator=gen) * 4
    kc = torch.randn(batch, n_keys, 3, 8, dtype=torch.float64, generator=gen)
    vc = torch.randn(batch, n_keys, 3, 5, dtype=torch.float64, generator=gen)
    leaves = [x.clone().requires_grad_(True) for x in (q, kc, vc)]
    ref_leaves = [x.clone().requires_grad_(True) for x in (q, kc, vc)]
    kwargs = dict(length=length, stride=stride, scale=0.3, cu_seqlens=cu)
    out, lse = naive.compressed_attention(*leaves, **kwargs, attend=chunked.chunked_positional_attention)
    ref_out, ref_lse = naive.compressed_attention(*ref_leaves, **kwargs)
    assert not torch.isnan(out).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))  # rows before the first window: no key
    finite = torch.isfinite(ref_lse)
    assert rel(out, ref_out) < 1e-13 and float((lse - ref_lse)[finite].detach().abs().max()) < 1e-12
    dout = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, leaves, dout), torch.autograd.grad(ref_out, ref_leaves, dout)):
        assert not torch.isnan(g).any() and rel(g, r) < 1e-12


def test_long_compressed_attention_takes_the_chunked_path(monkeypatch):
    from sparsa.ops.compress import chunked

    monkeypatch.setenv("SPARSA_BACKEND", "naive")
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 1000)
    calls = []
    real = chunked.chunked_positional_attention
    monkeypatch.setattr(chunked, "chunked_positional_attention", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    q = torch.randn(1, 64, 4, 8)
    kc = torch.randn(1, n_compressed(64, 8, 4), 2, 8)
    want, _ = naive.compressed_attention(q, kc, kc, length=8, stride=4, scale=8 ** -0.5)
    assert rel(compressed_attention(q, kc, kc, length=8, stride=4), want) < 1e-6
    assert calls == [(1, 64, 4, 8)]
