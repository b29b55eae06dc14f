"""Reference semantics of block keys, SSA selection, selected-block and full attention."""
import math

import pytest
import torch

import sparsa


def rand_qkv(batch, seqlen, n_heads_q, n_heads_kv, dim, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen, n_heads_q, dim, generator=g, dtype=dtype) * scale
    k = torch.randn(batch, seqlen, n_heads_kv, dim, generator=g, dtype=dtype) * scale
    v = torch.randn(batch, seqlen, n_heads_kv, dim, generator=g, dtype=dtype)
    return q, k, v


def loop_selection(q, k, block_size, topk, init_blocks, local_blocks):
    """Independent per-token implementation of SSA's selection rule (slow, explicit)."""
    batch, seqlen, n_heads_q, dim = q.shape
    n_heads_kv = k.shape[2]
    group = n_heads_q // n_heads_kv
    scale = dim ** -0.5
    out = torch.full((batch, seqlen, n_heads_kv, topk), -1, dtype=torch.int32)
    for b in range(batch):
        for t in range(seqlen):
            cur, n_visible = t // block_size, (t + 1) // block_size
            for h in range(n_heads_kv):
                kbar = [k[b, c * block_size:(c + 1) * block_size, h].mean(0) for c in range(n_visible)]
                score = {}
                for c in range(cur + 1):
                    score[c] = 0.0
                for g in range(h * group, (h + 1) * group):
                    if n_visible == 0:
                        continue
                    z = torch.stack([q[b, t, g] @ kb * scale for kb in kbar])
                    p = torch.softmax(z, 0)
                    for c in range(min(cur, n_visible)):
                        score[c] += float(p[c])
                for c in range(cur + 1):
                    if c < init_blocks or c > cur - local_blocks:
                        score[c] = math.inf
                best = sorted(score, key=lambda c: -score[c])[:topk]
                chosen = sorted(best)
                out[b, t, h, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


@pytest.mark.parametrize("n_heads_q,n_heads_kv", [(2, 2), (4, 2), (3, 1), (4, 1), (8, 1)])
@pytest.mark.parametrize("init_blocks,local_blocks", [(0, 1), (1, 2)])
def test_selection_matches_explicit_loop(n_heads_q, n_heads_kv, init_blocks, local_blocks):
    q, k, _ = rand_qkv(1, 45, n_heads_q, n_heads_kv, 8, seed=n_heads_q * 10 + init_blocks)
    got = sparsa.select_blocks(q, k, block_size=8, topk=3, init_blocks=init_blocks, local_blocks=local_blocks)
    want = loop_selection(q, k, 8, 3, init_blocks, local_blocks)
    assert got.dtype == torch.int32 and got.shape == (1, 45, n_heads_kv, 3)
    assert torch.equal(got, want)


def test_selection_invariants():
    q, k, _ = rand_qkv(2, 100, 6, 2, 16, seed=3)
    bs, topk = 8, 4
    idx = sparsa.select_blocks(q, k, block_size=bs, topk=topk, init_blocks=1, local_blocks=2)
    t = torch.arange(100)[None, :, None, None]
    cur = t // bs
    valid = idx >= 0
    assert (idx[valid] <= cur.expand_as(idx)[valid]).all(), "no future block"
    assert ((idx == cur).any(-1)).all(), "own block always selected"
    assert ((idx == 0).any(-1)).all(), "init block forced"
    prev = (idx == cur - 1).any(-1) | (cur[..., 0] == 0)
    assert prev.all(), "previous local block forced"
    # ascending with -1 only at the end
    for row in idx.reshape(-1, topk).tolist():
        real = [x for x in row if x >= 0]
        assert real == sorted(set(real)) and row == real + [-1] * (topk - len(real))
    # padding: the first block's tokens can see only block 0
    assert (idx[:, :bs, :, 1:] == -1).all()


def test_selection_shared_by_group_and_no_grad():
    q, k, _ = rand_qkv(1, 64, 4, 2, 8)
    q.requires_grad_(True)
    idx = sparsa.select_blocks(q, k, block_size=8, topk=2)
    assert not idx.requires_grad
    # permuting query heads inside a group does not change the group's selection
    perm = torch.tensor([1, 0, 3, 2])
    idx2 = sparsa.select_blocks(q.detach()[:, :, perm], k, block_size=8, topk=2)
    assert torch.equal(idx, idx2)


def explicit_sparse_attention(q, k, v, idx, block_size):
    """Per-(token, head) gather of the selected keys: an independent reference."""
    batch, seqlen, n_heads_q, _ = q.shape
    group = n_heads_q // k.shape[2]
    out = torch.zeros(batch, seqlen, n_heads_q, v.shape[-1], dtype=q.dtype)
    for b in range(batch):
        for t in range(seqlen):
            for g in range(n_heads_q):
                h = g // group
                keys = sorted({j for c in idx[b, t, h].tolist() if c >= 0
                               for j in range(c * block_size, min((c + 1) * block_size, t + 1))})
                logits = k[b, keys, h] @ q[b, t, g] * q.shape[-1] ** -0.5
                out[b, t, g] = torch.softmax(logits, 0) @ v[b, keys, h]
    return out


@pytest.mark.parametrize("n_heads_q,n_heads_kv", [(2, 1), (3, 3), (6, 2)])
def test_sparse_attention_matches_explicit_gather(n_heads_q, n_heads_kv):
    q, k, v = rand_qkv(1, 37, n_heads_q, n_heads_kv, 8, seed=5)
    idx = sparsa.select_blocks(q, k, block_size=4, topk=3, init_blocks=1)
    got = sparsa.sparse_attention(q, k, v, idx, block_size=4)
    want = explicit_sparse_attention(q, k, v, idx, 4)
    assert (got - want).abs().max() < 1e-12


def test_sparse_equals_full_when_topk_covers_everything():
    q, k, v = rand_qkv(2, 50, 4, 2, 16, seed=1)
    idx = sparsa.select_blocks(q, k, block_size=8, topk=7)
    for x in (q, k, v):
        x.requires_grad_(True)
    sparse = sparsa.sparse_attention(q, k, v, idx, block_size=8)
    grads_sparse = torch.autograd.grad(sparse.square().sum(), (q, k, v))
    full = sparsa.attention(q, k, v)
    grads_full = torch.autograd.grad(full.square().sum(), (q, k, v))
    assert (sparse - full).abs().max() < 1e-10
    for a, b in zip(grads_sparse, grads_full):
        assert (a - b).abs().max() < 1e-10


def test_sparse_gradients_match_explicit_reference():
    q, k, v = rand_qkv(1, 24, 4, 2, 4, seed=2)
    idx = sparsa.select_blocks(q, k, block_size=4, topk=2)
    inputs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    got = torch.autograd.grad(sparsa.sparse_attention(*inputs, idx, block_size=4).sin().sum(), inputs)
    inputs2 = [x.clone().requires_grad_(True) for x in (q, k, v)]
    want = torch.autograd.grad(explicit_sparse_attention(*inputs2, idx, 4).sin().sum(), inputs2)
    for a, b in zip(got, want):
        assert (a - b).abs().max() / b.abs().max() < 1e-10


def test_sparse_attention_lse_and_large_logits():
    q, k, v = rand_qkv(1, 32, 2, 1, 8, seed=4, scale=8.0)  # |q.k| up to ~ 50+
    idx = sparsa.select_blocks(q, k, block_size=8, topk=2)
    out, lse = sparsa.sparse_attention(q.float(), k.float(), v.float(), idx, block_size=8, return_lse=True)
    ref, ref_lse = sparsa.sparse_attention(q, k, v, idx, block_size=8, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert lse.dtype == torch.float32 and lse.shape == (1, 32, 2)
    assert (out.double() - ref).abs().max() / ref.abs().max() < 1e-5
    assert (lse.double() - ref_lse).abs().max() < 1e-4


def test_degenerate_selection_only_own_block():
    q, k, v = rand_qkv(1, 16, 2, 1, 4)
    idx = (torch.arange(16) // 4).view(1, 16, 1, 1).to(torch.int32)
    idx = torch.cat([idx, torch.full_like(idx, -1)], dim=-1)
    out = sparsa.sparse_attention(q, k, v, idx, block_size=4)
    assert torch.allclose(out[0, 0, :, :], v[0, 0, 0].expand(2, 4))  # first token sees only itself


def test_packed_documents_equal_separate_runs():
    q, k, v = rand_qkv(1, 70, 4, 2, 8, seed=9)
    cu = torch.tensor([0, 30, 33, 70], dtype=torch.int32)
    idx = sparsa.select_blocks(q, k, block_size=4, topk=3, cu_seqlens=cu)
    packed = sparsa.sparse_attention(q, k, v, idx, block_size=4, cu_seqlens=cu)
    full_packed = sparsa.attention(q, k, v, cu_seqlens=cu)
    for s, e in [(0, 30), (30, 33), (33, 70)]:
        idx_doc = sparsa.select_blocks(q[:, s:e], k[:, s:e], block_size=4, topk=3)
        assert torch.equal(idx[:, s:e], idx_doc)
        alone = sparsa.sparse_attention(q[:, s:e], k[:, s:e], v[:, s:e], idx_doc, block_size=4)
        assert (packed[:, s:e] - alone).abs().max() < 1e-12
        assert (full_packed[:, s:e] - sparsa.attention(q[:, s:e], k[:, s:e], v[:, s:e])).abs().max() < 1e-12
    kb = sparsa.block_keys(k, 4, cu_seqlens=cu)
    assert kb.shape[1] == 30 // 4 + 0 + 37 // 4
    assert torch.allclose(kb[:, 0], k[:, 0:4].mean(1))
    assert torch.allclose(kb[:, 7], k[:, 33:37].mean(1))


def test_block_keys_mean_of_complete_blocks():
    _, k, _ = rand_qkv(2, 35, 2, 2, 4)
    kb = sparsa.block_keys(k, 8)
    assert kb.shape == (2, 4, 2, 4)
    assert torch.allclose(kb[:, 3], k[:, 24:32].mean(1))


@pytest.mark.parametrize("call,match", [
    (lambda q, k, v: sparsa.select_blocks(q, k, block_size=0, topk=2), "block_size"),
    (lambda q, k, v: sparsa.select_blocks(q, k, block_size=4, topk=1, init_blocks=1, local_blocks=1), "topk"),
    (lambda q, k, v: sparsa.select_blocks(q, k[:, :, :1].expand(-1, -1, 3, -1), block_size=4, topk=2), "multiple"),
    (lambda q, k, v: sparsa.select_blocks(q.float(), k, block_size=4, topk=2), "dtype"),
    (lambda q, k, v: sparsa.select_blocks(q[:, :0], k[:, :0], block_size=4, topk=2), "empty"),
    (lambda q, k, v: sparsa.attention(q, k, v[:, :5]), "v"),
    (lambda q, k, v: sparsa.attention(q[0], k, v), "q"),
    (lambda q, k, v: sparsa.sparse_attention(q, k, v, torch.zeros(1, 16, 2, 2), block_size=4), "block_indices"),
    (lambda q, k, v: sparsa.sparse_attention(q, k, v, torch.full((1, 16, 2, 2), 9, dtype=torch.int32), block_size=4),
     "block_indices"),
    (lambda q, k, v: sparsa.attention(q, k, v, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)), "cu_seqlens"),
    (lambda q, k, v: sparsa.block_keys(k, -1), "block_size"),
])
def test_bad_inputs_raise_value_error(call, match):
    q, k, v = rand_qkv(1, 16, 4, 2, 8)
    with pytest.raises(ValueError, match=match):
        call(q, k, v)


def test_ties_break_to_lower_block_and_do_not_depend_on_length():
    q = torch.zeros(1, 130, 2, 8, dtype=torch.float64)  # every past block scores the same
    k = torch.randn(1, 130, 1, 8, dtype=torch.float64)
    long = sparsa.select_blocks(q, k, block_size=8, topk=3)
    for length in (40, 77, 129):
        short = sparsa.select_blocks(q[:, :length], k[:, :length], block_size=8, topk=3)
        assert torch.equal(short, long[:, :length])
    t = 100  # cur = 12: forced block 12, then the two lowest past blocks
    assert long[0, t, 0].tolist() == [0, 1, 12]
