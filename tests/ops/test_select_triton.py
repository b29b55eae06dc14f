"""Triton block selection (SSA / NSA / InfLLM-V2 rules) against the PyTorch reference.

Without a GPU the kernel runs in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Ties may break differently: we check that both selections contain the forced blocks and reach the
same total score (the "selected attention mass"), and that indices agree exactly on every row whose
k-th and (k+1)-th best scores are clearly separated.
"""
import pytest
import torch

import sparsa
from sparsa.ops.compress import naive as compress_naive
from sparsa.ops.select import naive

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def reference_scores(q, k, rule, block_size, scale, length=None, stride=None, keys=None):
    """float64 block scores [B, T, Hkv, n_all] (-inf invalid) of one document."""
    q64 = q.double().cpu()
    if rule == "ssa":  # keys pooled in the input dtype, as both implementations do
        kbar = naive.block_keys(k.cpu(), block_size).double()
        return naive.block_scores_dense(q64, kbar, q.shape[1], block_size, scale)
    if keys is None:
        keys = compress_naive.mean_pool(k.cpu(), length, stride)
    reduce = "sum" if rule == "nsa" else "max"
    return naive.pooled_block_scores_dense(q64, keys.double(), q.shape[1], block_size, length, stride, scale, reduce)


def check_selection(out, ref, scores, forced, topk, tol=1e-3):
    """out/ref [B, T, Hkv, topk]; scores [B, T, Hkv, n_all] float64; forced [T, n_all]."""
    assert out.shape == ref.shape and out.dtype == torch.int32
    out, ref = out.cpu().long(), ref.cpu().long()
    scores, forced = scores.cpu(), forced.cpu()
    n_all = scores.shape[-1]
    assert int(out.min()) >= -1 and int(out.max()) < n_all
    # ascending, -1 right-padded, no duplicates
    valid = out >= 0
    assert torch.equal(valid, ref >= 0), "number of selected blocks differs"
    big = torch.where(valid, out, torch.full_like(out, n_all + 1))
    sorted_ok = (big[..., 1:] > big[..., :-1]) | ~valid[..., 1:]
    assert bool(sorted_ok.all()), "indices not strictly ascending"
    # forced blocks present in both
    forced_b = forced[None, :, None, :].expand_as(scores)
    chosen = torch.zeros(*out.shape[:-1], n_all + 1, dtype=torch.bool)
    chosen.scatter_(-1, torch.where(valid, out, torch.full_like(out, n_all)), True)
    chosen = chosen[..., :n_all]
    assert bool((chosen | ~forced_b).all()), "a forced block is missing"
    # same selected mass (sum of the non-forced selected scores)
    finite = torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
    safe_out = torch.where(valid, out, torch.zeros_like(out))
    safe_ref = torch.where(valid, ref, torch.zeros_like(ref))
    free_out = valid & ~torch.gather(forced_b, -1, safe_out)
    free_ref = valid & ~torch.gather(forced_b, -1, safe_ref)
    mass_out = (torch.gather(finite, -1, safe_out) * free_out).sum(-1)
    mass_ref = (torch.gather(finite, -1, safe_ref) * free_ref).sum(-1)
    assert torch.allclose(mass_out, mass_ref, atol=tol, rtol=tol), float((mass_out - mass_ref).abs().max())
    # exact indices where the choice is clear: gap between the k-th and (k+1)-th free score
    ranked = torch.where(forced_b, torch.full_like(scores, float("inf")), scores)
    values = torch.sort(ranked, dim=-1, descending=True).values
    if n_all > topk:
        gap = values[..., topk - 1] - values[..., topk]
        clear = (gap > 10 * tol) | ~torch.isfinite(gap)
    else:
        clear = torch.ones(values.shape[:-1], dtype=torch.bool)
    assert torch.equal(out[clear], ref[clear])
    assert clear.float().mean() > 0.5  # the comparison above is not vacuous


@pytest.mark.parametrize(
    "dtype,batch,group,topk,init,local",
    [(torch.float32, 2, 1, 4, 1, 1), (torch.float32, 1, 3, 5, 0, 2), (torch.float16, 1, 4, 8, 2, 1)]
    + ([(torch.bfloat16, 2, 8, 16, 1, 2)] if DEVICE == "cuda" else []),
)
def test_ssa_matches_reference(triton_backend, dtype, batch, group, topk, init, local):
    torch.manual_seed(group * 10 + topk)
    seqlen, n_kv, dim, bs = 200, 2, 32, 16
    q = torch.randn(batch, seqlen, n_kv * group, dim, device=DEVICE, dtype=dtype)
    k = torch.randn(batch, seqlen, n_kv, dim, device=DEVICE, dtype=dtype)
    kw = dict(block_size=bs, topk=topk, init_blocks=init, local_blocks=local)
    out = sparsa.select_blocks(q, k, **kw)
    ref = naive.select_blocks(q.float(), k.float(), scale=dim ** -0.5, **kw)
    scores = reference_scores(q, k, "ssa", bs, dim ** -0.5)
    forced = naive.forced_mask(seqlen, bs, init, local, "cpu")
    tol = 1e-3 if dtype != torch.bfloat16 else 1e-2
    check_selection(out, ref, scores, forced, topk, tol)


def test_ssa_large_logits(triton_backend):
    torch.manual_seed(1)
    seqlen, dim, bs = 160, 32, 16
    q = 40 * torch.randn(1, seqlen, 4, dim, device=DEVICE)
    k = torch.randn(1, seqlen, 2, dim, device=DEVICE)
    kw = dict(block_size=bs, topk=4, init_blocks=1, local_blocks=1)
    out = sparsa.select_blocks(q, k, **kw)
    ref = naive.select_blocks(q.cpu(), k.cpu(), scale=dim ** -0.5, **kw)
    scores = reference_scores(q.cpu(), k.cpu(), "ssa", bs, dim ** -0.5)
    assert torch.isfinite(scores[torch.isfinite(scores)]).all()
    check_selection(out, ref, scores, naive.forced_mask(seqlen, bs, 1, 1, "cpu"), 4)


@pytest.mark.parametrize("rule,dtype", [("nsa", torch.float32), ("infllm", torch.float16)]
                         + ([("nsa", torch.bfloat16)] if DEVICE == "cuda" else []))
def test_pooled_rules_match_reference(triton_backend, rule, dtype):
    torch.manual_seed(7)
    seqlen, n_kv, group, dim, bs, length, stride, topk = 256, 2, 2, 32, 32, 16, 8, 4
    q = torch.randn(1, seqlen, n_kv * group, dim, device=DEVICE, dtype=dtype)
    k = torch.randn(1, seqlen, n_kv, dim, device=DEVICE, dtype=dtype)
    kw = dict(block_size=bs, topk=topk, init_blocks=1, local_blocks=2, score=rule,
              compress_length=length, compress_stride=stride)
    out = sparsa.select_blocks(q, k, **kw)
    ref = naive.select_blocks_pooled(q.float().cpu(), k.float().cpu(), block_size=bs, topk=topk, init_blocks=1,
                                     local_blocks=2, scale=dim ** -0.5, length=length, stride=stride,
                                     reduce="sum" if rule == "nsa" else "max")
    scores = reference_scores(q.cpu(), k.cpu(), rule, bs, dim ** -0.5, length, stride)
    tol = 1e-3 if dtype != torch.bfloat16 else 1e-2
    check_selection(out, ref, scores, naive.forced_mask(seqlen, bs, 1, 2, "cpu"), topk, tol)


def test_nsa_with_compressed_keys_and_lse(triton_backend):
    """NSA: learned compressed keys and the compression branch's LSE (skips the normalisation pass)."""
    torch.manual_seed(3)
    seqlen, n_kv, group, dim, bs, length, stride, topk = 224, 1, 4, 32, 32, 16, 8, 3
    q = torch.randn(1, seqlen, n_kv * group, dim, device=DEVICE)
    k = torch.randn(1, seqlen, n_kv, dim, device=DEVICE)
    kc = torch.randn(1, compress_naive.n_compressed(seqlen, length, stride), n_kv, dim, device=DEVICE)
    _, lse = compress_naive.compressed_attention(q, kc, kc, length=length, stride=stride, scale=dim ** -0.5)
    kw = dict(block_size=bs, topk=topk, init_blocks=1, local_blocks=1, score="nsa", compress_length=length,
              compress_stride=stride, compressed_keys=kc)
    with_lse = sparsa.select_blocks(q, k, compressed_lse=lse, **kw)
    without = sparsa.select_blocks(q, k, **kw)
    ref = naive.select_blocks_pooled(q.cpu(), k.cpu(), block_size=bs, topk=topk, init_blocks=1, local_blocks=1,
                                     scale=dim ** -0.5, length=length, stride=stride, reduce="sum", keys=kc.cpu())
    scores = reference_scores(q.cpu(), k.cpu(), "nsa", bs, dim ** -0.5, length, stride, keys=kc.cpu())
    forced = naive.forced_mask(seqlen, bs, 1, 1, "cpu")
    check_selection(with_lse, ref, scores, forced, topk)
    check_selection(without, ref, scores, forced, topk)


@pytest.mark.parametrize("rule", ["ssa", "nsa", "infllm"])
def test_packed_documents(triton_backend, rule):
    torch.manual_seed(11)
    lengths = [70, 13, 120, 53]  # one document shorter than a block
    seqlen, n_kv, group, dim, bs = sum(lengths), 2, 2, 16, 16
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q = torch.randn(1, seqlen, n_kv * group, dim, device=DEVICE)
    k = torch.randn(1, seqlen, n_kv, dim, device=DEVICE)
    kw = dict(block_size=bs, topk=4, init_blocks=1, local_blocks=1)
    extra = {} if rule == "ssa" else dict(score=rule, compress_length=8, compress_stride=4)
    out = sparsa.select_blocks(q, k, cu_seqlens=cu, **kw, **extra)
    start = 0
    for n in lengths:  # each document on its own must give the same selection
        qs, ks = q[:, start:start + n], k[:, start:start + n]
        if rule == "ssa":
            ref = naive.select_blocks(qs.cpu(), ks.cpu(), scale=dim ** -0.5, **kw)
            scores = reference_scores(qs.cpu(), ks.cpu(), "ssa", bs, dim ** -0.5)
        else:
            ref = naive.select_blocks_pooled(qs.cpu(), ks.cpu(), scale=dim ** -0.5, length=8, stride=4,
                                             reduce="sum" if rule == "nsa" else "max", **kw)
            scores = reference_scores(qs.cpu(), ks.cpu(), rule, bs, dim ** -0.5, 8, 4)
        check_selection(out[:, start:start + n], ref, scores, naive.forced_mask(n, bs, 1, 1, "cpu"), 4)
        start += n


def test_topk_larger_than_available_blocks(triton_backend):
    torch.manual_seed(5)
    q = torch.randn(1, 40, 2, 16, device=DEVICE)
    k = torch.randn(1, 40, 1, 16, device=DEVICE)
    out = sparsa.select_blocks(q, k, block_size=16, topk=7, init_blocks=0, local_blocks=1)
    ref = naive.select_blocks(q.cpu(), k.cpu(), block_size=16, topk=7, init_blocks=0, local_blocks=1, scale=0.25)
    assert torch.equal(out.cpu(), ref)  # every available block is selected: no tie ambiguity
    assert int(out[0, 5, 0, 1]) == -1 and int(out[0, 39, 0, 2]) == 2 and int(out[0, 39, 0, 3]) == -1


def test_nsa_rule_with_block_pooling_is_ssa():
    """Reference identity: the pooled rule with length = stride = block_size is the SSA rule."""
    torch.manual_seed(2)
    q = torch.randn(1, 96, 4, 16, dtype=torch.float64)
    k = torch.randn(1, 96, 2, 16, dtype=torch.float64)
    kw = dict(block_size=16, topk=3, init_blocks=0, local_blocks=1)
    ssa = sparsa.select_blocks(q, k, **kw)
    nsa = sparsa.select_blocks(q, k, score="nsa", compress_length=16, compress_stride=16, **kw)
    assert torch.equal(ssa, nsa)


def test_nsa_overlap_weights():
    first, weights = naive.overlap_offsets(64, 32, 16)
    assert first == 1 and weights == [1.0, 2.0, 2.0, 2.0, 1.0]  # NSA paper setting (l=32, d=16, l'=64)
    assert naive.overlap_offsets(64, 64, 64) == (0, [1.0])


def test_select_validation():
    q = torch.randn(1, 64, 2, 16)
    k = torch.randn(1, 64, 1, 16)
    with pytest.raises(ValueError, match="compress_stride"):
        sparsa.select_blocks(q, k, block_size=16, topk=2, score="nsa", compress_length=12, compress_stride=12)
    with pytest.raises(ValueError, match="compress_length"):
        sparsa.select_blocks(q, k, block_size=16, topk=2, compress_length=8)
    with pytest.raises(ValueError, match="compressed_lse"):
        sparsa.select_blocks(q, k, block_size=16, topk=2, score="infllm", compressed_lse=torch.zeros(1, 64, 2))
    with pytest.raises(ValueError, match="compressed_keys"):
        sparsa.select_blocks(q, k, block_size=16, topk=2, score="nsa", compressed_keys=torch.zeros(1, 4, 1, 16))
    with pytest.raises(ValueError, match="score"):
        sparsa.select_blocks(q, k, block_size=16, topk=2, score="moba")


@pytest.mark.parametrize("nsub,tl_sort", [(2, False), (4, False)] + ([(4, True)] if DEVICE == "cuda" else []))
def test_kernel_variants(triton_backend, monkeypatch, nsub, tl_sort):
    """Several KP-block sub-chunks per scoring step, and triton's own sort (GPU), give the same selection."""
    from sparsa.ops.select import triton_select

    for name in ("GPU_CONFIG", "INTERPRETER_CONFIG"):
        monkeypatch.setitem(getattr(triton_select, name), "nsub", nsub)
        monkeypatch.setitem(getattr(triton_select, name), "tl_sort", tl_sort)
    torch.manual_seed(9)
    seqlen, dim, bs = 300, 16, 8
    q = 3 * torch.randn(1, seqlen, 4, dim, device=DEVICE)  # peaked scores: most rows have a clear top-k
    k = torch.randn(1, seqlen, 2, dim, device=DEVICE)
    kw = dict(block_size=bs, topk=6, init_blocks=1, local_blocks=2)
    out = sparsa.select_blocks(q, k, **kw)
    ref = naive.select_blocks(q.cpu(), k.cpu(), scale=dim ** -0.5, **kw)
    check_selection(out, ref, reference_scores(q, k, "ssa", bs, dim ** -0.5), naive.forced_mask(seqlen, bs, 1, 2, "cpu"), 6)
