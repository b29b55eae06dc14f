"""The KV-outer forward with the local blocks in their own kernel (kv_local.py, SPARSA_KV_LOCAL_SPLIT=1) against the
float64 reference: forward without gradients (o, lse), in the Triton interpreter on CPU or on a GPU."""
import os

import pytest
import torch

import sparsa
from sparsa.ops import _alloc as alloc_mod
from sparsa.ops.sparse_attn import kv_local, naive, triton_ops
from sparsa.ops.sparse_attn.index import random_selection
from tests.helpers import rel_err as rel
from tests.ops.test_sparse_attn_triton import make_inputs

CUDA = torch.cuda.is_available()
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (CUDA or INTERP), reason="needs a GPU or the Triton interpreter")
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture
def split(monkeypatch):
    """SPARSA_KV_LOCAL_SPLIT=1, Triton backend, NaN-poisoned outputs; returns the list of local launches seen."""
    monkeypatch.setenv("SPARSA_BACKEND", "triton")
    monkeypatch.setenv("SPARSA_KV_LOCAL_SPLIT", "1")
    monkeypatch.setattr(alloc_mod, "POISON_OUTPUTS", True)
    calls = []
    real = kv_local.launch_local

    def spy(*args, **kwargs):
        calls.append(args[-2:])  # (h0, n_heads)
        return real(*args, **kwargs)

    monkeypatch.setattr(kv_local, "launch_local", spy)
    return calls


def _inputs(*args, **kwargs):
    """q, k, v of test_sparse_attn_triton.make_inputs (same arguments)."""
    return make_inputs(*args, **kwargs)[:3]


def _check_forward(q, k, v, idx, block_size, cu_seqlens=None, tol=2e-5):
    scale = q.shape[-1] ** -0.5
    o_ref, lse_ref = naive.sparse_attention(*(x.double() for x in (q, k, v)), idx, block_size=block_size, scale=scale,
                                            cu_seqlens=cu_seqlens)
    with torch.no_grad():
        o, lse = sparsa.sparse_attention(q, k, v, idx, block_size=block_size, cu_seqlens=cu_seqlens, return_lse=True,
                                         loop_order="kv_outer")
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    fin = torch.isfinite(lse_ref)
    assert torch.equal(fin, torch.isfinite(lse))
    assert rel(o, o_ref) < tol, rel(o, o_ref)
    assert rel(lse[fin], lse_ref[fin]) < tol


@pytest.mark.parametrize("group", [1, 3, 4])
def test_local_split_packed_documents_and_degenerate_rows(group, split):
    """Block 16, three packed documents (one shorter than a block): tokens without their own or previous block,
    with only block 0, with far blocks only, with only their own block, rows of -1 padding, repeated slots."""
    cu = torch.tensor([0, 37, 41, 112], dtype=torch.int32, device=DEVICE)
    q, k, v = _inputs(1, 112, 2, group, 16, torch.float32, seed=40 + group)
    idx = random_selection(1, 112, 2, 4, 16, cu_seqlens=cu.cpu(), generator=torch.Generator().manual_seed(group),
                           device=DEVICE)
    idx[0, 60:70, 0, -1] = -1  # drop the own block (the last slot of an ascending row)
    idx[0, 90:100, 1, 1:] = -1  # keep only block 0
    idx[0, 80:84, 0] = torch.tensor([1, 2, -1, -1], dtype=torch.int32, device=DEVICE)  # far blocks only
    idx[0, 105, 1] = torch.tensor([-1, -1, 4, -1], dtype=torch.int32, device=DEVICE)  # only its own block
    idx[0, 20:24, 1] = -1  # nothing selected: o = 0, lse = -inf
    idx[0, 100:104, 0] = torch.tensor([5, 0, 5, 0], dtype=torch.int32, device=DEVICE)  # repeats (block 5: own)
    _check_forward(q, k, v, idx, 16, cu_seqlens=cu)
    assert split == [(0, 2)]


def test_local_split_fp16_large_logits_batch_dv_block32(split):
    """fp16 inputs with |q.k| ~ 50, batch 2 (two documents), Dv != D, block 32."""
    q, k, v = _inputs(2, 80, 1, 4, 16, torch.float16, dim_v=32, logit=50.0, seed=12)
    idx = random_selection(2, 80, 1, 3, 32, generator=torch.Generator().manual_seed(12), device=DEVICE)
    _check_forward(q, k, v, idx, 32, tol=5e-3)
    assert split


def test_local_split_in_several_head_slices(split, monkeypatch):
    """One pair index per KV head (h0 = 0, 1, 2): the local kernel fills its slice's heads only."""
    monkeypatch.setattr(triton_ops, "PAIR_BUFFER_BYTES", 1)
    q, k, v = _inputs(1, 48, 3, 2, 16, torch.float32, seed=70)
    idx = random_selection(1, 48, 3, 3, 16, generator=torch.Generator().manual_seed(70), device=DEVICE)
    _check_forward(q, k, v, idx, 16)
    assert split == [(0, 1), (1, 1), (2, 1)]


def test_local_split_is_not_used_when_inputs_need_gradients(split):
    """The backward needs every pair in its index: with gradients the forward keeps the local pairs, and the
    gradients still match the reference."""
    q, k, v = _inputs(1, 64, 1, 2, 16, torch.float32, seed=3)
    idx = random_selection(1, 64, 1, 3, 16, generator=torch.Generator().manual_seed(3), device=DEVICE)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o = sparsa.sparse_attention(*leaves, idx, block_size=16, loop_order="kv_outer")
    o.sum().backward()
    assert split == []
    ref = [x.double().clone().requires_grad_(True) for x in (q, k, v)]
    naive.sparse_attention(*ref, idx, block_size=16, scale=16**-0.5)[0].sum().backward()
    for a, b in zip(leaves, ref):
        assert rel(a.grad, b.grad) < 2e-5


def test_local_split_setting(monkeypatch):
    monkeypatch.setenv("SPARSA_KV_LOCAL_SPLIT", "1")
    assert kv_local.uses_split(False) and not kv_local.uses_split(True)
    monkeypatch.setenv("SPARSA_KV_LOCAL_SPLIT", "0")
    assert not kv_local.uses_split(False)
    monkeypatch.setenv("SPARSA_KV_LOCAL_SPLIT", "yes")
    with pytest.raises(ValueError, match="SPARSA_KV_LOCAL_SPLIT"):
        kv_local.enabled()


def test_local_split_with_gradients_rebuilds_the_backward_index(split, monkeypatch):
    """kv_local.WITH_GRAD: the split forward with gradients, then the backward's own pair index (local pairs in)."""
    monkeypatch.setattr(kv_local, "WITH_GRAD", True)
    q, k, v = _inputs(1, 80, 2, 2, 16, torch.float32, seed=5)
    idx = random_selection(1, 80, 2, 4, 16, generator=torch.Generator().manual_seed(5), device=DEVICE)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    do = torch.randn_like(q)
    o = sparsa.sparse_attention(*leaves, idx, block_size=16, loop_order="kv_outer")
    o.backward(do)
    assert split == [(0, 2)]
    ref = [x.double().clone().requires_grad_(True) for x in (q, k, v)]
    o_ref = naive.sparse_attention(*ref, idx, block_size=16, scale=16**-0.5)[0]
    o_ref.backward(do.double())
    assert rel(o, o_ref) < 2e-5
    for a, b in zip(leaves, ref):
        assert rel(a.grad, b.grad) < 2e-5


@pytest.mark.parametrize("dim,block", [(256, 16), (32, 128)])
def test_local_split_wide_heads_and_block_128(dim, block, split):
    """Head dim 256 (32 rows per program) and block 128 (a sub-tile walks part of a block's tokens)."""
    q, k, v = _inputs(1, 3 * block // 2 + 5, 1, 2, dim, torch.float32, seed=dim)
    n = q.shape[1]
    idx = random_selection(1, n, 1, 3, block, generator=torch.Generator().manual_seed(dim), device=DEVICE)
    _check_forward(q, k, v, idx, block)
    assert split


def test_local_split_with_reductions_on_a_side_stream(split, monkeypatch):
    """SPARSA_KV_OVERLAP=1 (one merge per head chunk): every chunk's merge starts from the local kernel's rows."""
    monkeypatch.setenv("SPARSA_KV_OVERLAP", "1")
    q, k, v = _inputs(1, 64, 4, 2, 16, torch.float32, seed=8)
    idx = random_selection(1, 64, 4, 4, 16, generator=torch.Generator().manual_seed(8), device=DEVICE)
    _check_forward(q, k, v, idx, 16)
    assert split == [(0, 4)]


def test_local_split_wins_over_the_fused_local_merge(split, monkeypatch):
    """SPARSA_KV_LOCAL=1 together with the split: the split runs (MAIN and the merge see no local pair) and the
    result is still the reference's."""
    monkeypatch.setenv("SPARSA_KV_LOCAL", "1")
    q, k, v = _inputs(1, 70, 2, 3, 16, torch.float32, seed=9)
    idx = random_selection(1, 70, 2, 4, 16, generator=torch.Generator().manual_seed(9), device=DEVICE)
    _check_forward(q, k, v, idx, 16)
    assert split == [(0, 2)]
