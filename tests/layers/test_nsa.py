"""NSABranches: composition of the three branches, gradients, packed documents, Triton vs reference."""
import pytest
import torch

import sparsa
import sparsa.layers.nsa as nsa_module
from sparsa.layers.nsa import NSABranches
from sparsa.layers.rope import apply_rope, rope_cos_sin, rope_frequencies
from sparsa.ops.compress import compressed_attention, mean_pool
from sparsa.ops.window import window_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HIDDEN, HQ, HKV, D = 32, 4, 2, 16
CFG = dict(block_size=16, topk=4, init_blocks=1, local_blocks=1, compress_length=8, compress_stride=4, window=24)


def make_inputs(seqlen, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(1, seqlen, HIDDEN, device=DEVICE, dtype=dtype)
    q = torch.randn(1, seqlen, HQ, D, device=DEVICE, dtype=dtype)
    k = torch.randn(1, seqlen, HKV, D, device=DEVICE, dtype=dtype)
    v = torch.randn(1, seqlen, HKV, D, device=DEVICE, dtype=dtype)
    return x, q, k, v


def test_branches_compose_reference(monkeypatch):
    """o = g_cmp * compressed + g_slc * selected + g_win * window, each branch from the public ops."""
    monkeypatch.setenv("SPARSA_BACKEND", "naive")
    module = NSABranches(HIDDEN, HQ, HKV, D, compress="mean", **CFG).double()
    x, q, k, v = (t.double().cpu() for t in make_inputs(80))
    out, parts = module(x, q, k, v, return_parts=True)
    kc, vc = mean_pool(k, length=8, stride=4), mean_pool(v, length=8, stride=4)
    o_cmp, lse = compressed_attention(q, kc, vc, length=8, stride=4, return_lse=True)
    idx = sparsa.select_blocks(q, k, block_size=16, topk=4, init_blocks=1, local_blocks=1, score="nsa",
                               compress_length=8, compress_stride=4)
    assert torch.equal(idx, parts["block_indices"])
    # the NSA rule computed from the branch's LSE equals the one that recomputes it
    idx_lse = sparsa.select_blocks(q, k, block_size=16, topk=4, init_blocks=1, local_blocks=1, score="nsa",
                                   compress_length=8, compress_stride=4, compressed_keys=kc, compressed_lse=lse)
    assert torch.equal(idx, idx_lse)
    o_slc = sparsa.sparse_attention(q, k, v, idx, block_size=16)
    o_win = window_attention(q, k, v, window=24)
    g = torch.sigmoid(module.gate_proj(x)).view(1, 80, 3, HQ)[..., None]
    expected = g[:, :, 0] * o_cmp + g[:, :, 1] * o_slc + g[:, :, 2] * o_win
    assert torch.allclose(out, expected, atol=1e-12)


def test_gradients_reach_every_parameter(monkeypatch):
    monkeypatch.setenv("SPARSA_BACKEND", "naive")
    module = NSABranches(HIDDEN, HQ, HKV, D, **CFG)
    x, q, k, v = (t.cpu().requires_grad_(True) for t in make_inputs(64, seed=1))
    k_raw = k.detach().clone().requires_grad_(True)
    out = module(x, q, k, v, k_raw=k_raw)
    out.square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    for t in (x, q, k, v, k_raw):
        assert t.grad is not None and torch.isfinite(t.grad).all()


def test_mlp_initialised_as_mean_and_rotated_compressed_keys():
    module = NSABranches(HIDDEN, HQ, HKV, D, **CFG).double()
    _, _, k, v = (t.double().cpu() for t in make_inputs(50, seed=2))
    kc, vc = module.compressed_kv(k, v, rotate=True)
    pooled = mean_pool(k, length=8, stride=4)
    positions = (torch.arange(pooled.shape[1]) * 4)[None, :]
    cos, sin = rope_cos_sin(positions, rope_frequencies(D, 10000.0))
    assert torch.allclose(kc, apply_rope(pooled, cos, sin), atol=1e-12)
    assert torch.allclose(vc, mean_pool(v, length=8, stride=4), atol=1e-12)


def test_packed_documents_match_separate_documents(monkeypatch):
    monkeypatch.setenv("SPARSA_BACKEND", "naive")
    module = NSABranches(HIDDEN, HQ, HKV, D, **CFG).double()
    x, q, k, v = (t.double().cpu() for t in make_inputs(90, seed=3))
    cu = torch.tensor([0, 37, 42, 90], dtype=torch.int32)
    packed = module(x, q, k, v, k_raw=k, cu_seqlens=cu)
    for s, e in ((0, 37), (37, 42), (42, 90)):
        alone = module(x[:, s:e], q[:, s:e], k[:, s:e], v[:, s:e], k_raw=k[:, s:e])
        assert torch.allclose(packed[:, s:e], alone, atol=1e-10)


def _reference_sparse_attention(q, k, v, block_indices, *, block_size, scale=None, cu_seqlens=None):
    from sparsa.ops.sparse_attn import naive as sparse_naive

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return sparse_naive.sparse_attention(q, k, v, block_indices, block_size=block_size, scale=scale,
                                         cu_seqlens=cu_seqlens)[0]


def test_triton_matches_reference(monkeypatch):
    """The compressed / window / selection kernels of this layer in Triton against the float64 reference.

    On CPU the selected-attention branch uses its PyTorch reference (its own Triton kernel is tested in
    tests/ops and is slow in the interpreter); on a GPU everything runs in Triton.
    """
    if DEVICE == "cpu":
        monkeypatch.setattr(nsa_module, "sparse_attention", _reference_sparse_attention)
    module = NSABranches(HIDDEN, HQ, HKV, D, **CFG).to(DEVICE)
    x, q, k, v = make_inputs(64, seed=4)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    monkeypatch.setenv("SPARSA_BACKEND", "triton")
    out = module(x, *leaves, k_raw=leaves[1])
    grads = torch.autograd.grad(out.square().sum(), leaves)
    monkeypatch.setenv("SPARSA_BACKEND", "naive")
    ref_leaves = [t.detach().cpu().double().requires_grad_(True) for t in (q, k, v)]
    ref_module = module.to("cpu").double()
    ref = ref_module(x.cpu().double(), *ref_leaves, k_raw=ref_leaves[1])
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_leaves)
    rel = lambda a, b: float((a.detach().cpu().double() - b.detach()).norm() / b.detach().norm())  # noqa: E731
    assert rel(out, ref) < 1e-4
    for g, rg in zip(grads, ref_grads):
        assert rel(g, rg) < 1e-3


def test_validation():
    with pytest.raises(ValueError, match="compress_stride"):
        NSABranches(HIDDEN, HQ, HKV, D, block_size=16, compress_stride=12)
    with pytest.raises(ValueError, match="compress"):
        NSABranches(HIDDEN, HQ, HKV, D, compress="max")
    with pytest.raises(ValueError, match="n_heads"):
        NSABranches(HIDDEN, 3, 2, D)
