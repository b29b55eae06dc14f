"""Triton selected-block attention vs the PyTorch reference (both loop orders, fwd + bwd).

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton loads); shapes are small and dtypes fp32/fp16 (bf16 dots are wrong there).
"""

import os

import pytest
import torch

import sparsa
from sparsa.ops.sparse_attn import naive
from sparsa.ops import _alloc as alloc_mod
from sparsa.ops.sparse_attn.index import pooled_selection, random_selection
from tests.helpers import rel_err as rel

CUDA = torch.cuda.is_available()
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (CUDA or INTERP), reason="needs a GPU or the Triton interpreter")
DEVICE = "cuda" if CUDA else "cpu"
ORDERS = ("q_outer", "kv_outer", "q_tile")


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("SPARSA_BACKEND", "triton")
    monkeypatch.setattr(alloc_mod, "POISON_OUTPUTS", True)


def make_inputs(batch, seqlen, hkv, group, dim, dtype, dim_v=None, logit=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dim_v = dim_v or dim
    q = torch.randn(batch, seqlen, hkv * group, dim, generator=gen)
    k = torch.randn(batch, seqlen, hkv, dim, generator=gen)
    v = torch.randn(batch, seqlen, hkv, dim_v, generator=gen)
    if logit is not None:  # |q . k| * scale up to ~logit
        q = q * (logit / dim**0.5) ** 0.5 * 1.5
        k = k * (logit / dim**0.5) ** 0.5 * 1.5
    do = torch.randn(batch, seqlen, hkv * group, dim_v, generator=gen)
    return [x.to(DEVICE, dtype) for x in (q, k, v, do)]


def run(fn, q, k, v, do, **kw):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    o, lse = fn(q, k, v, **kw)
    o.backward(do)
    return o.detach(), lse.detach(), q.grad, k.grad, v.grad


def check(q, k, v, do, idx, block_size, cu_seqlens=None, orders=ORDERS, tol=None, grads=True, grad_floor=0.0):
    """Every order's o, lse (and dq, dk, dv) against the float64 reference by relative error < tol; a
    gradient's error is relative to at least grad_floor * ||do|| (for references that are zero)."""
    scale = q.shape[-1] ** -0.5
    ref = run(
        lambda a, b, c: naive.sparse_attention(a, b, c, idx, block_size=block_size, scale=scale, cu_seqlens=cu_seqlens),
        *(x.double() for x in (q, k, v, do)),
    )
    tol = tol or (2e-5 if q.dtype == torch.float32 else 5e-3)
    for order in orders:
        out = run(
            lambda a, b, c, order=order: sparsa.sparse_attention(
                a, b, c, idx, block_size=block_size, cu_seqlens=cu_seqlens, return_lse=True, loop_order=order
            ),
            q,
            k,
            v,
            do,
        )
        names = ("o", "lse", "dq", "dk", "dv") if grads else ("o", "lse")
        for name, a, b in zip(names, out, ref):
            assert not torch.isnan(a).any(), f"{order}: NaN in {name}"
            if name == "lse":
                fin = torch.isfinite(b)
                assert torch.equal(fin, torch.isfinite(a)), f"{order}: lse finiteness"
                a, b = a[fin], b[fin]
            floor = grad_floor * float(do.double().norm()) if name.startswith("d") else 0.0
            err = rel(a, b, floor)
            assert err < tol, f"{order}: {name} rel err {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("group", [1, 2, 3, 4, 8])
def test_random_selection_fp32(group):
    hkv = 2 if group == 1 else 1
    seqlen, bs, topk = (48, 16, 3) if group == 1 else (64, 16, 3)
    q, k, v, do = make_inputs(1, seqlen, hkv, group, 16, torch.float32, seed=group)
    idx = random_selection(1, seqlen, hkv, topk, bs, generator=torch.Generator().manual_seed(group), device=DEVICE)
    check(q, k, v, do, idx, bs)


def test_batch_dv_and_block32_fp32():
    q, k, v, do = make_inputs(2, 48, 1, 2, 16, torch.float32, dim_v=32, seed=11)
    idx = random_selection(2, 48, 1, 2, 32, generator=torch.Generator().manual_seed(5), device=DEVICE)
    check(q, k, v, do, idx, 32)


def test_head_dims_below_their_tile_and_a_short_last_block_fp32():
    """Head dims 24 / 40 (tiles of 32 / 64 columns: the column-masked loads) and 70 tokens in blocks of 16
    (a last block of 6 keys, whose missing keys the unmasked kernels read as its last key and mask)."""
    q, k, v, do = make_inputs(1, 70, 2, 3, 24, torch.float32, dim_v=40, seed=13)
    idx = random_selection(1, 70, 2, 3, 16, generator=torch.Generator().manual_seed(13), device=DEVICE)
    check(q, k, v, do, idx, 16)


def test_fp16_large_logits():
    q, k, v, do = make_inputs(1, 64, 1, 4, 32, torch.float16, logit=50.0, seed=3)
    logits = torch.einsum("thd,tkd->th", q[0, :, :1].float(), k[0].float()) * 32**-0.5
    assert logits.abs().max() > 30  # the test really has large logits
    idx = random_selection(1, 64, 1, 3, 16, generator=torch.Generator().manual_seed(3), device=DEVICE)
    check(q, k, v, do, idx, 16, tol=1e-2)


def test_fp32_large_logits_packed_documents():
    cu = torch.tensor([0, 23, 48, 80], dtype=torch.int32, device=DEVICE)
    q, k, v, do = make_inputs(1, 80, 1, 3, 16, torch.float32, logit=50.0, seed=4)
    idx = random_selection(
        1, 80, 1, 3, 16, cu_seqlens=cu.cpu(), generator=torch.Generator().manual_seed(4), device=DEVICE
    )
    check(q, k, v, do, idx, 16, cu_seqlens=cu, tol=1e-4)


def test_every_token_selects_the_same_block():
    seqlen, bs = 64, 16
    q, k, v, do = make_inputs(1, seqlen, 1, 4, 16, torch.float32, seed=6)
    cur = torch.arange(seqlen, device=DEVICE) // bs
    idx = torch.full((1, seqlen, 1, 3), -1, dtype=torch.int32, device=DEVICE)
    idx[0, :, 0, 0] = torch.where(cur >= 1, torch.ones_like(cur), cur).int()  # block 1 (or 0 before it exists)
    idx[0, :, 0, 1] = torch.where(cur > 1, cur, torch.full_like(cur, -1)).int()
    check(q, k, v, do, idx, bs)


def test_unsorted_rows_with_repeated_blocks_count_each_block_once():
    """Set semantics: a block listed twice in non-adjacent slots (and -1 between valid slots) counts once."""
    seqlen, bs = 64, 16
    q, k, v, do = make_inputs(1, seqlen, 2, 2, 16, torch.float32, seed=9)
    cur = (torch.arange(seqlen, device=DEVICE) // bs).int()
    idx = torch.full((1, seqlen, 2, 4), -1, dtype=torch.int32, device=DEVICE)
    idx[0, :, 0, 0], idx[0, :, 0, 1], idx[0, :, 0, 3] = cur, 0, cur  # own block twice, block 0 between
    idx[0, :, 1, 0], idx[0, :, 1, 2], idx[0, :, 1, 3] = 0, cur, 0  # block 0 twice, -1 in slot 1
    check(q, k, v, do, idx, bs)


def test_only_block_zero_and_maximal_padding():
    seqlen, bs, topk = 64, 16, 8
    q, k, v, do = make_inputs(1, seqlen, 1, 2, 16, torch.float32, seed=7)
    idx = torch.full((1, seqlen, 1, topk), -1, dtype=torch.int32, device=DEVICE)
    idx[..., 0] = 0  # only block 0 (keys <= t inside it; later tokens see all 16 keys)
    check(q, k, v, do, idx, bs)


def test_rows_without_keys_give_zero_and_minus_inf():
    seqlen, bs = 48, 16
    q, k, v, do = make_inputs(1, seqlen, 1, 2, 16, torch.float32, seed=8)
    idx = random_selection(1, seqlen, 1, 2, bs, generator=torch.Generator().manual_seed(8), device=DEVICE)
    idx[0, 5] = -1  # no block at all
    idx[0, 6, 0, 0], idx[0, 6, 0, 1] = 2, -1  # only a future block
    for order in ORDERS:
        o, lse = sparsa.sparse_attention(q, k, v, idx, block_size=bs, return_lse=True, loop_order=order)
        assert torch.all(o[0, 5:7] == 0) and torch.all(lse[0, 5:7] == float("-inf")), order
    check(q, k, v, do, idx, bs, grads=True)


@pytest.mark.parametrize("group,slots", [(1, 1), (3, 1), (1, 4), (3, 2)])
def test_reductions_over_several_token_programs(group, slots, monkeypatch):
    """The per-token reductions (forward merge, dQ sum) take several tokens per program: force 16-row
    programs (G = 3: 5 tokens and one masked row each; 96 tokens end in a partial program), topk = 5 and
    holes of -1 slots; slot by slot and `slots` slots per step (topk = 5: a masked tail step)."""
    from sparsa.ops.sparse_attn import kv_outer as kv_mod

    monkeypatch.setattr(kv_mod, "REDUCE_ROWS", 2)  # 2 * 128 // head dim 16 = 16 rows
    monkeypatch.setattr(kv_mod, "REDUCE_SLOTS", slots)
    block_r, tokens, _ = kv_mod.reduce_config(group, 16)
    assert block_r == 16 and tokens == 16 // group and 96 % tokens != 0 or group == 1
    q, k, v, do = make_inputs(1, 96, 1, group, 16, torch.float32, seed=20 + group)
    idx = random_selection(1, 96, 1, 5, 16, generator=torch.Generator().manual_seed(group), device=DEVICE)
    idx[0, 40:60, 0, 1] = -1  # holes between valid slots
    check(q, k, v, do, idx, 16, orders=("kv_outer",))


@pytest.mark.parametrize("early_v, hints", [(True, False), (True, True), (False, True)])
def test_kv_outer_main_experiments(early_v, hints, monkeypatch):
    """MAIN with V loaded together with K (MAIN_EARLY_V) and with L2 eviction hints (CACHE_HINTS, also in the
    merge), holes and G = 3."""
    from sparsa.ops.sparse_attn import kv_outer as kv_mod

    monkeypatch.setattr(kv_mod, "MAIN_EARLY_V", early_v)
    monkeypatch.setattr(kv_mod, "CACHE_HINTS", hints)
    q, k, v, do = make_inputs(1, 72, 2, 3, 16, torch.float32, seed=51)
    idx = random_selection(1, 72, 2, 4, 16, generator=torch.Generator().manual_seed(51), device=DEVICE)
    idx[0, 20:30, 0, 2:] = -1  # holes
    check(q, k, v, do, idx, 16, orders=("kv_outer",))


def test_cache_hints_rule(monkeypatch):
    """L2 eviction hints: on for G = 1 only by default (measured on the H100), forced either way."""
    from sparsa.ops.sparse_attn import kv_outer as kv_mod

    monkeypatch.setattr(kv_mod, "CACHE_HINTS", None)
    assert [kv_mod.cache_hints(g) for g in (1, 2, 4, 8, 16)] == [True, False, False, False, False]
    monkeypatch.setattr(kv_mod, "CACHE_HINTS", False)
    assert not kv_mod.cache_hints(1)
    monkeypatch.setattr(kv_mod, "CACHE_HINTS", True)
    assert kv_mod.cache_hints(4)


def test_launch_override_shape():
    """A launch override is (BLOCK_M, num_warps[, maxnreg[, num_stages]]): anything else is a ValueError."""
    from sparsa.ops.sparse_attn import kv_outer as kv_mod

    assert kv_mod.forced_config((64, 4, 0, 2), 8) == (64, 4, {"num_stages": 2})
    assert kv_mod.forced_config((16, 4), 32) == (32, 4, {})
    for bad in ((64,), (64, 4, 0, 2, 4)):
        with pytest.raises(ValueError, match="launch override"):
            kv_mod.forced_config(bad, 4)


def test_kv_outer_with_the_triton_pair_index(monkeypatch):
    """The attention with the Triton-built index (SPARSA_PAIR_INDEX=triton), packed documents, G = 3."""
    monkeypatch.setenv("SPARSA_PAIR_INDEX", "triton")
    cu = torch.tensor([0, 23, 48, 80], dtype=torch.int32, device=DEVICE)
    q, k, v, do = make_inputs(1, 80, 1, 3, 16, torch.float32, seed=31)
    idx = random_selection(
        1, 80, 1, 3, 16, cu_seqlens=cu.cpu(), generator=torch.Generator().manual_seed(31), device=DEVICE
    )
    check(q, k, v, do, idx, 16, cu_seqlens=cu, orders=("kv_outer",))


@pytest.mark.parametrize("local,group,rows,slots", [("0", 1, 32, 1), ("1", 1, 32, 1), ("0", 3, 16, 1), ("1", 3, 16, 1), ("1", 3, 16, 2)])
def test_kv_outer_local_blocks_in_the_merge(local, group, rows, slots, monkeypatch):
    """SPARSA_KV_LOCAL=1: the local blocks (block 0, own, previous) are computed by the merge kernel and
    skipped by MAIN; =0: every pair through MAIN. Merge tiles of `rows` rows span block and document
    boundaries (block 16, packed documents); some tokens miss their own or previous block or select only
    far blocks, one token only its own block."""
    from sparsa.ops.sparse_attn import kv_outer as kv_mod

    monkeypatch.setenv("SPARSA_KV_LOCAL", local)
    monkeypatch.setattr(kv_mod, "LOCAL_OVERRIDE", (rows, 4))
    monkeypatch.setattr(kv_mod, "REDUCE_SLOTS", slots)
    cu = torch.tensor([0, 37, 41, 112], dtype=torch.int32, device=DEVICE)
    q, k, v, do = make_inputs(1, 112, 2, group, 16, torch.float32, seed=40 + group)
    idx = random_selection(
        1, 112, 2, 4, 16, cu_seqlens=cu.cpu(), generator=torch.Generator().manual_seed(group), device=DEVICE
    )
    idx[0, 60:70, 0, -1] = -1  # drop the own block (the last slot of an ascending row)
    idx[0, 90:100, 1, 1:] = -1  # keep only block 0
    idx[0, 80:84, 0] = torch.tensor([1, 2, -1, -1], dtype=torch.int32, device=DEVICE)  # far blocks only
    idx[0, 105, 1] = torch.tensor([-1, -1, 4, -1], dtype=torch.int32, device=DEVICE)  # only its own block
    check(q, k, v, do, idx, 16, cu_seqlens=cu, orders=("kv_outer",))


def test_kv_outer_local_blocks_fp16_large_logits_batch_dv(monkeypatch):
    """The fused local blocks with fp16 inputs, |q.k| ~ 50, batch 2 (two documents), Dv != D, block 32."""
    monkeypatch.setenv("SPARSA_KV_LOCAL", "1")
    q, k, v, do = make_inputs(2, 80, 1, 4, 16, torch.float16, dim_v=32, logit=50.0, seed=12)
    idx = random_selection(2, 80, 1, 3, 32, generator=torch.Generator().manual_seed(12), device=DEVICE)
    check(q, k, v, do, idx, 32, orders=("kv_outer",), tol=1e-2)


@pytest.mark.parametrize("group", [1, 8])
def test_kv_outer_tuned_main_launch(group):
    """Head dim 128, block 64: MAIN runs the per-G tuned launch of FWD_TUNED (64 rows / 4 warps, no register
    cap); a head dim it was not tuned for keeps the default (128 rows)."""
    from sparsa.ops.sparse_attn import kv_outer as kv_mod

    block_m, warps, opts = kv_mod.fwd_config(group, 128, 64)
    tuned = kv_mod.FWD_TUNED[group]
    assert (block_m, warps) == tuned[:2]
    assert opts.get("maxnreg", 0) == tuned[2]
    assert kv_mod.fwd_config(group, 64, 64) == (128, 4, {})
    q, k, v, do = make_inputs(1, 192, 1, group, 128, torch.float32, seed=50 + group)
    idx = random_selection(1, 192, 1, 3, 64, generator=torch.Generator().manual_seed(group), device=DEVICE)
    check(q, k, v, do, idx, 64, orders=("kv_outer",), grads=False)


@pytest.mark.parametrize("keys", ["0", "1"])
def test_kv_outer_backward_split_groups_both_layouts(keys, monkeypatch):
    """dK/dV with every group cut into items of one row tile (MAX_PAIRS_PER_ITEM = 1: fp32 partial slots
    summed by SPLIT_REDUCE), with the gathered rows (SPARSA_KV_BWD_KEYS=0) or the keys (=1) as MMA rows."""
    from sparsa.ops.sparse_attn import backward as bwd_mod

    monkeypatch.setenv("SPARSA_KV_BWD_KEYS", keys)
    monkeypatch.setattr(bwd_mod, "MAX_PAIRS_PER_ITEM", 1)
    cu = torch.tensor([0, 70, 96], dtype=torch.int32, device=DEVICE)
    q, k, v, do = make_inputs(1, 96, 2, 2, 16, torch.float32, dim_v=32, seed=60)
    idx = random_selection(
        1, 96, 2, 4, 16, cu_seqlens=cu.cpu(), generator=torch.Generator().manual_seed(60), device=DEVICE
    )
    check(q, k, v, do, idx, 16, cu_seqlens=cu, orders=("kv_outer",))


@pytest.mark.parametrize("local", ["0", "1"])
def test_kv_heads_in_several_slices(local, monkeypatch):
    """A tiny PAIR_BUFFER_BYTES puts each KV head in its own slice (three pair indices, h0 = 0, 1, 2): forward
    (with and without the fused local blocks) and backward fill their heads only."""
    from sparsa.ops.sparse_attn import triton_ops

    monkeypatch.setattr(triton_ops, "PAIR_BUFFER_BYTES", 1)
    assert len(triton_ops._head_slices(3, 48, 3, 2, 16, 16)) == 3
    monkeypatch.setenv("SPARSA_KV_LOCAL", local)
    q, k, v, do = make_inputs(1, 48, 3, 2, 16, torch.float32, seed=70)
    idx = random_selection(1, 48, 3, 3, 16, generator=torch.Generator().manual_seed(70), device=DEVICE)
    check(q, k, v, do, idx, 16)


@pytest.mark.parametrize("tma", ["0", "1"])
def test_q_tile_backward_with_split_blocks(tma, monkeypatch):
    """q_tile's dK/dV with every block's tiles cut into one-tile items (TILES_PER_ITEM = 1: partial slots and
    SPLIT_REDUCE), 8-token tiles across packed documents, G = 2, Dv != D; its dQ (and the forward) with K / V by
    TMA or not."""
    from sparsa.ops.sparse_attn import q_tile as qt_mod
    from sparsa.ops.sparse_attn import q_tile_backward as qtb_mod

    monkeypatch.setattr(qtb_mod, "TILES_PER_ITEM", 1)
    monkeypatch.setenv("SPARSA_Q_TILE_TMA", tma)
    monkeypatch.setattr(qtb_mod, "DQ_TMA", True)
    monkeypatch.setattr(qt_mod, "TILE_ROWS", 1)  # 16-row tiles: 8 tokens x 2 heads
    cu = torch.tensor([0, 37, 41, 96], dtype=torch.int32, device=DEVICE)
    q, k, v, do = make_inputs(1, 96, 2, 2, 16, torch.float32, dim_v=32, seed=90)
    idx = random_selection(
        1, 96, 2, 4, 16, cu_seqlens=cu.cpu(), generator=torch.Generator().manual_seed(90), device=DEVICE
    )
    check(q, k, v, do, idx, 16, cu_seqlens=cu, orders=("q_tile",))


@pytest.mark.parametrize("tma", ["0", "1"])
@pytest.mark.parametrize("group, dtype", [(1, torch.float32), (3, torch.float16), (2, torch.float32)])
def test_hybrid_backward_after_q_tile(group, dtype, tma, monkeypatch):
    """SPARSA_Q_TILE_BACKWARD=hybrid: dK / dV from the KV-outer kernels without dQ partials (their reduction is
    never called), dQ from q_tile's dQ kernel (K / V by TMA or not); against the float64 reference on packed
    documents with a document shorter than a block, repeated and padded (-1) slots, and every token choosing only
    block 0 and its own."""
    from sparsa.ops.sparse_attn import backward as bwd_mod

    from sparsa.ops.sparse_attn import q_tile_backward as qtb_mod

    monkeypatch.setenv("SPARSA_Q_TILE_BACKWARD", "hybrid")
    monkeypatch.setenv("SPARSA_Q_TILE_TMA", tma)
    monkeypatch.setattr(qtb_mod, "DQ_TMA", True)
    monkeypatch.setattr(bwd_mod, "_dq_sum", lambda *a: (_ for _ in ()).throw(AssertionError("dQ partials summed")))
    cu = torch.tensor([0, 45, 52, 112], dtype=torch.int32, device=DEVICE)
    q, k, v, do = make_inputs(1, 112, 2, group, 32, dtype, dim_v=16 if group == 2 else None, logit=30.0, seed=96)
    check_packed_and_degenerate(q, k, v, do, 96, 16, cu, "q_tile")


@pytest.mark.parametrize("dtype, tma", [(torch.float32, "0"), (torch.float16, "1")])
def test_query_outer_order_on_one_token_tiles(dtype, tma, monkeypatch):
    """SPARSA_ONE_TOKEN_TILES=1: the query-outer order's forward runs the union-list kernel on one-token tiles
    (rows = the token's 16 heads; K / V by TMA or not), its backward the KV-outer one; against the float64
    reference on packed documents, repeated and padded slots, large logits and only block 0 + the own block."""
    from sparsa.ops.sparse_attn import q_outer as qo_mod
    from sparsa.ops.sparse_attn import triton_ops

    monkeypatch.setenv("SPARSA_ONE_TOKEN_TILES", "1")
    monkeypatch.setenv("SPARSA_Q_OUTER_TMA", "0")  # the TMA query-outer kernel goes ahead of the tiles where it applies
    monkeypatch.setenv("SPARSA_Q_TILE_TMA", tma)
    tiles = []
    real = triton_ops.q_tile_forward
    monkeypatch.setattr(triton_ops, "q_tile_forward", lambda *a, **kw: tiles.append(kw.get("tile")) or real(*a, **kw))
    monkeypatch.setattr(qo_mod, "_q_outer_fwd_kernel", None)  # the query-outer kernel must not run
    cu = torch.tensor([0, 21, 25, 64], dtype=torch.int32, device=DEVICE)
    q, k, v, do = make_inputs(1, 64, 1, 16, 32, dtype, logit=40.0, seed=98)
    check_packed_and_degenerate(q, k, v, do, 98, 8, cu, "q_outer")
    assert tiles and all(t == (16, 1, 2) for t in tiles)


@pytest.mark.parametrize("dtype, group, skip", [(torch.float32, 16, True), (torch.float32, 16, False),
                                               (torch.float16, 16, True), (torch.float32, 3, False)])
def test_query_outer_kernel_with_tma_loads(dtype, group, skip, monkeypatch):
    """SPARSA_Q_OUTER_TMA=1: the query-outer kernel loads K / V blocks by TMA (no tile unions, the one-token tiles
    never run), its backward the KV-outer one; against the float64 reference on packed documents (a document
    shorter than a block, blocks cut by a document end, a last block whose TMA box runs past N), repeated and
    padded (-1) slots, large logits, and every token choosing only block 0 and its own block; with and without
    the loop starting past the leading padding (TMA_SKIP_PADDING)."""
    from sparsa.ops.sparse_attn import q_outer as qo_mod
    from sparsa.ops.sparse_attn import triton_ops

    monkeypatch.setenv("SPARSA_Q_OUTER_TMA", "1")
    monkeypatch.setenv("SPARSA_Q_TILE_TMA", "1")  # TMA in the interpreter
    monkeypatch.setattr(triton_ops, "q_tile_forward", None)  # the one-token tiles must not run
    monkeypatch.setattr(qo_mod, "TMA_SKIP_PADDING", skip)
    calls = []
    real = qo_mod.q_outer_forward
    monkeypatch.setattr(triton_ops, "q_outer_forward", lambda *a, **kw: calls.append(kw.get("tma")) or real(*a, **kw))
    cu = torch.tensor([0, 21, 25, 64], dtype=torch.int32, device=DEVICE)
    q, k, v, do = make_inputs(1, 64, 2 if group == 3 else 1, group, 32, dtype, logit=40.0, seed=97)
    check_packed_and_degenerate(q, k, v, do, 97, 8, cu, "q_outer")
    assert calls and all(calls)


def test_query_outer_tma_rule(monkeypatch):
    """q_outer_tma: 0 never; 1 wherever list_tma allows TMA; auto only with Q_OUTER_TMA_AUTO (on by default), G in
    Q_OUTER_TMA_GROUPS (8 to 16), head dims and blocks up to 128; a bad value is a ValueError naming the variable."""
    from sparsa.ops.sparse_attn import q_tile as qt_mod

    monkeypatch.setenv("SPARSA_Q_TILE_TMA", "1")
    q, kv = torch.zeros(64, 16, 32), torch.zeros(64, 1, 32)
    monkeypatch.setenv("SPARSA_Q_OUTER_TMA", "1")
    assert qt_mod.q_outer_tma(q, kv, kv, 16)
    assert not qt_mod.q_outer_tma(q, torch.zeros(64, 1, 24), torch.zeros(64, 1, 24), 16)  # no TMA box of width 24
    monkeypatch.setenv("SPARSA_Q_OUTER_TMA", "0")
    assert not qt_mod.q_outer_tma(q, kv, kv, 16)
    monkeypatch.setenv("SPARSA_Q_OUTER_TMA", "auto")
    assert qt_mod.Q_OUTER_TMA_AUTO and qt_mod.Q_OUTER_TMA_GROUPS == (8, 16)
    assert qt_mod.q_outer_tma(q, kv, kv, 16) and not qt_mod.q_outer_tma(q, kv, kv, 256)
    for heads, expected in ((4, False), (8, True), (12, True), (32, False)):  # G measured: 8 and 16
        assert qt_mod.q_outer_tma(torch.zeros(64, heads, 32), kv, kv, 16) == expected, heads
    assert not qt_mod.q_outer_tma(torch.zeros(64, 16, 256), torch.zeros(64, 1, 256), torch.zeros(64, 1, 256), 16)
    monkeypatch.setattr(qt_mod, "Q_OUTER_TMA_AUTO", False)
    assert not qt_mod.q_outer_tma(q, kv, kv, 16)
    monkeypatch.setenv("SPARSA_Q_OUTER_TMA", "yes")
    with pytest.raises(ValueError, match="SPARSA_Q_OUTER_TMA"):
        qt_mod.q_outer_tma(q, kv, kv, 16)


def test_one_token_tile_rule(monkeypatch):
    """one_token_tile: automatic only at G = 16 from 2048 tokens (up to 128K and more) where the list forward
    uses TMA (so never for CPU tensors without SPARSA_Q_TILE_TMA=1), head dims and blocks up to 128; 1 forces it at G = 16, 32, ... (not at
    G = 8 or 24); 0 never; other values are a ValueError naming the variable."""
    from sparsa.ops.sparse_attn import q_tile as qt_mod

    def tile(n, group, dim=128, block=64):
        q = torch.empty(n, group, dim)
        kv = torch.empty(n, 1, dim)
        return qt_mod.one_token_tile(q, kv, kv, block)

    monkeypatch.delenv("SPARSA_ONE_TOKEN_TILES", raising=False)
    monkeypatch.setenv("SPARSA_Q_TILE_TMA", "0")
    assert tile(4096, 16) is None  # no TMA
    monkeypatch.setattr(qt_mod, "list_tma", lambda k, v: True)
    assert tile(4096, 16) == (16, 1, 2)
    assert tile(1024, 16) is None and tile(4096, 8) is None and tile(4096, 32) is None
    assert tile(4096, 16, dim=256) is None and tile(4096, 16, block=256) is None
    assert tile(131072, 16) == (16, 1, 2)
    monkeypatch.setenv("SPARSA_ONE_TOKEN_TILES", "1")
    assert tile(64, 16, dim=256) == (16, 1, 2) and tile(64, 32) == (32, 1, 4)
    assert tile(64, 8) is None and tile(64, 24) is None
    monkeypatch.setenv("SPARSA_ONE_TOKEN_TILES", "0")
    assert tile(4096, 16) is None
    monkeypatch.setenv("SPARSA_ONE_TOKEN_TILES", "yes")
    with pytest.raises(ValueError, match="SPARSA_ONE_TOKEN_TILES"):
        tile(4096, 16)


def check_packed_and_degenerate(q, k, v, do, seed, block_size, cu, order):
    """check() of one order on packed documents (cu) with repeated (a block listed twice counts once) and padded
    (-1) slots, then with every token choosing only block 0 and its own block."""
    n_tokens, hkv = q.shape[1], k.shape[2]
    idx = random_selection(1, n_tokens, hkv, 4 if n_tokens > 64 else 3, block_size, cu_seqlens=cu.cpu(),
                           generator=torch.Generator().manual_seed(seed))
    idx[0, n_tokens * 5 // 8:, :, 1] = idx[0, n_tokens * 5 // 8:, :, 2]
    idx[0, n_tokens * 4 // 5:, :, 0] = -1
    check(q, k, v, do, idx.to(DEVICE), block_size, cu_seqlens=cu, orders=(order,))
    only_first = torch.full_like(idx, -1)
    only_first[..., 0] = 0
    only_first[..., 1] = torch.div(torch.arange(n_tokens), block_size, rounding_mode="floor").view(1, n_tokens, 1)
    check(q, k, v, do, only_first.to(DEVICE), block_size, orders=(order,))


@pytest.mark.parametrize("variant", ["list", "walk", "list_tma"])
def test_q_tile_forward_kernels_packed_fp16_large_logits(variant, monkeypatch):
    """Both q_tile forwards (over precomputed tile unions, also with K / V by TMA, and the single-pass merge) on
    packed documents with fp16 logits up to ~50, repeated blocks in a row, a last document's block that runs
    past the sequence (TMA: rows past N read as 0) and a pooled (shared-block) selection."""
    from sparsa.ops.sparse_attn import q_tile as qt_mod

    monkeypatch.setattr(qt_mod, "UNION_LIST", variant != "walk")
    monkeypatch.setenv("SPARSA_Q_TILE_TMA", "1" if variant == "list_tma" else "0")
    used = []
    real = qt_mod.list_tma
    monkeypatch.setattr(qt_mod, "list_tma", lambda *a: used.append(real(*a)) or used[-1])
    cu = torch.tensor([0, 50, 53, 128], dtype=torch.int32, device=DEVICE)
    q, k, v, do = make_inputs(1, 128, 2, 3, 32, torch.float16, logit=50.0, seed=91)
    idx = random_selection(1, 128, 2, 5, 16, cu_seqlens=cu.cpu(), generator=torch.Generator().manual_seed(91))
    idx[0, 60:, :, 1] = idx[0, 60:, :, 2]  # a block listed twice counts once
    check(q, k, v, do, idx.to(DEVICE), 16, cu_seqlens=cu, orders=("q_tile",), grads=False)
    q, k, v, do = make_inputs(1, 160, 2, 2, 16, torch.float32, seed=92)
    idx = pooled_selection(160, 2, 6, 16, 4, tile=32, generator=torch.Generator().manual_seed(92))
    check(q, k, v, do, idx.to(DEVICE), 16, orders=("q_tile",))
    if variant != "walk":
        assert used and all(u == (variant == "list_tma") for u in used), used


@pytest.mark.parametrize("sample_programs", [10**6, 5])
def test_selection_waste_matches_its_definition(sample_programs):
    """locality.selection_waste (every tile, and a sample of them) against the sets of the tiles' selected
    blocks, on packed documents (a block id is local to its document) with unsorted rows."""
    from sparsa.ops.sparse_attn import locality
    from sparsa.ops.sparse_attn.index import doc_meta

    n, hkv, topk, bs, tokens = 200, 2, 5, 16, 8
    cu = torch.tensor([0, 90, 200], dtype=torch.int32)
    idx = random_selection(1, n, hkv, topk, bs, cu_seqlens=cu, generator=torch.Generator().manual_seed(7))[0]
    idx = idx[:, :, torch.randperm(topk, generator=torch.Generator().manual_seed(8))]  # any slot order
    meta = doc_meta(1, n, cu.to(DEVICE), bs, torch.device(DEVICE))
    n_tiles = -(-n // tokens)
    stride = max(1, -(-n_tiles * hkv // sample_programs))
    base = meta.tok_blockbase.cpu()
    work = useful = 0
    for t0 in range(0, n, tokens * stride):
        rows = idx[t0 : t0 + tokens].long()
        gid = torch.where(rows >= 0, rows + base[t0 : t0 + tokens, None, None], -1)
        useful += int((rows >= 0).sum())
        work += sum(len(set(gid[:, h][gid[:, h] >= 0].tolist())) for h in range(hkv)) * tokens
    got = locality.selection_waste(idx.to(DEVICE).contiguous(), meta, tokens, sample_programs)
    assert abs(got - work / useful) < 1e-9, (got, work / useful)
    assert stride == 1 or sample_programs < n_tiles * hkv


def test_automatic_order_takes_q_tile_on_shared_blocks(monkeypatch):
    """With the locality check (here on CPU, from 64 tokens): pooled selections (tiles share their blocks) take
    the query-tile order (outputs and gradients match the reference), random ones do not; on by default,
    SPARSA_LOCALITY_CHECK=0 turns it off."""
    from sparsa.ops.sparse_attn import locality, triton_ops
    from sparsa.ops.sparse_attn import q_tile as qt_mod

    monkeypatch.setattr(locality, "DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(locality, "MIN_TOKENS", 64)
    monkeypatch.setattr(locality, "CHECK_EVERY", 1)  # every call measured (on CUDA: read one call later)
    monkeypatch.setattr(locality, "MONITOR", locality.LocalityMonitor())
    monkeypatch.setenv("SPARSA_LOCALITY_CHECK", "1")
    monkeypatch.setattr(qt_mod, "TILE_ROWS", 4)  # 16-token tiles at head dim 16, G = 2
    monkeypatch.setattr(triton_ops, "automatic_loop_order", lambda *a, **kw: "kv_outer")  # the size rule's choice at 64K
    calls = []
    real = triton_ops.q_tile_forward
    monkeypatch.setattr(triton_ops, "q_tile_forward", lambda *a: calls.append(1) or real(*a))
    q, k, v, do = make_inputs(1, 512, 2, 2, 16, torch.float32, seed=94)
    # waste 1.42 and 2.79 (max_waste(2) 2.1, 1.85 without TMA)
    pooled = pooled_selection(512, 2, 6, 16, 6, tile=64, generator=torch.Generator().manual_seed(94)).to(DEVICE)
    rnd = random_selection(1, 512, 2, 6, 16, generator=torch.Generator().manual_seed(94), device=DEVICE)
    sync = torch.cuda.synchronize if CUDA else (lambda: None)
    sparsa.sparse_attention(q, k, v, pooled, block_size=16)  # CUDA: measured here, read on the next call
    sync()
    calls.clear()
    check(q, k, v, do, pooled, 16, orders=(None,))
    assert calls, "pooled selection: q_tile expected"
    sparsa.sparse_attention(q, k, v, rnd, block_size=16)
    sync()
    calls.clear()
    sparsa.sparse_attention(q, k, v, rnd, block_size=16)
    assert not calls, "random selection: q_tile not expected"
    sparsa.sparse_attention(q, k, v, pooled, block_size=16)
    sync()
    calls.clear()
    monkeypatch.setenv("SPARSA_LOCALITY_CHECK", "0")  # off
    sparsa.sparse_attention(q, k, v, pooled, block_size=16)
    assert not calls
    monkeypatch.delenv("SPARSA_LOCALITY_CHECK")  # on by default
    sparsa.sparse_attention(q, k, v, pooled, block_size=16)
    assert calls
    monkeypatch.setenv("SPARSA_LOCALITY_CHECK", "yes")
    with pytest.raises(ValueError, match="SPARSA_LOCALITY_CHECK"):
        sparsa.sparse_attention(q, k, v, pooled, block_size=16)


def test_locality_monitor_measures_every_nth_call(monkeypatch):
    """LocalityMonitor: a new count on every CHECK_EVERY-th call of a shape (CUDA: read once its event has
    completed, never waited for), the same value as selection_waste on that sample, shapes kept apart."""
    from sparsa.ops.sparse_attn import locality
    from sparsa.ops.sparse_attn.index import doc_meta

    monkeypatch.setattr(locality, "CHECK_EVERY", 3)
    n, hkv, topk, bs, tokens = 256, 2, 6, 16, 16
    meta = doc_meta(1, n, None, bs, torch.device(DEVICE))
    gen = torch.Generator().manual_seed(31)
    pooled = pooled_selection(n, hkv, topk, bs, 6, tile=64, generator=gen)[0].to(DEVICE).contiguous()
    rnd = random_selection(1, n, hkv, topk, bs, generator=gen, device=DEVICE)[0].contiguous()
    expect = {name: locality.selection_waste(x, meta, tokens, locality.default_sample_programs(tokens, topk))
              for name, x in (("pooled", pooled), ("random", rnd))}
    assert expect["pooled"] < expect["random"], expect
    half = rnd[:128].contiguous()  # another shape: its own count, not this shape's
    half_waste = locality.selection_waste(half, meta, tokens, locality.default_sample_programs(tokens, topk))
    launches = []
    real = locality._launch_count
    monkeypatch.setattr(locality, "_launch_count", lambda *a: launches.append(1) or real(*a))
    monitor = locality.LocalityMonitor()

    def waste(x):
        got = monitor.waste(x, meta, tokens)
        if CUDA:
            torch.cuda.synchronize()  # so that the next call can read this call's count
        return got

    first = waste(pooled)
    assert first == (None if CUDA else expect["pooled"])
    assert waste(rnd) == expect["pooled"] and waste(rnd) == expect["pooled"]  # calls 1, 2: no new count
    assert len(launches) == 1
    got = waste(rnd)  # call 3: a new count, on the random selection
    assert len(launches) == 2
    assert got == (expect["pooled"] if CUDA else expect["random"])
    assert waste(rnd) == expect["random"]
    assert waste(half) == (None if CUDA else half_waste)
    assert len(launches) == 3  # another shape: its own count
    monitor.reset()
    assert waste(pooled) == first and len(launches) == 4
    monkeypatch.setattr(locality, "MAX_SHAPES", 2)  # a third shape drops the first one seen
    waste(half)
    waste(rnd[:64].contiguous())
    assert len(monitor._shapes) == 2 and len(launches) == 6
    waste(pooled)  # dropped above: counted again as a new shape
    assert len(launches) == 7
    monitor.waste(pooled, doc_meta(1, n, None, bs // 2, torch.device(DEVICE)), tokens)  # another block size
    assert len(launches) == 8


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_gpu_locality_check_without_synchronisation(monkeypatch):
    """The automatic order with the locality check (bf16, 4K tokens, G = 4) never waits for the device
    (torch.cuda.set_sync_debug_mode("error")) and, once its count is read, takes q_tile on pooled selections."""
    from sparsa.ops.sparse_attn import locality, triton_ops

    monkeypatch.setenv("SPARSA_LOCALITY_CHECK", "1")
    monkeypatch.setattr(locality, "MONITOR", locality.LocalityMonitor())
    orders = []
    real = triton_ops._SparseAttention.apply
    monkeypatch.setattr(triton_ops._SparseAttention, "apply", lambda *a: orders.append(a[-1]) or real(*a))
    n, hkv, group, d, topk, bs = 4096, 2, 4, 128, 16, 64
    q, k, v, _ = make_inputs(1, n, hkv, group, d, torch.bfloat16, seed=95)
    idx = pooled_selection(n, hkv, topk, bs, 20, generator=torch.Generator().manual_seed(95)).to("cuda")
    sparsa.sparse_attention(q, k, v, idx, block_size=bs)  # compiles every kernel outside the debug mode
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            out = sparsa.sparse_attention(q, k, v, idx, block_size=bs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert orders[0] != "q_tile" and orders[-1] == "q_tile", orders
    ref = sparsa.sparse_attention(q, k, v, idx, block_size=bs, loop_order="kv_outer")
    assert rel(out, ref) < 1e-2


def test_locality_threshold_per_group(monkeypatch):
    """max_waste: 2.4 at G = 1 and 16, 2.2 at G = 4 and 8, 2.1 at G = 2 and unmeasured G (measured crossovers with
    TMA 2.25-2.69), 12% lower without TMA; prefers_q_tile compares the monitor's latest count against it and says
    no before the first count."""
    from sparsa.ops.sparse_attn import locality

    assert [locality.max_waste(g) for g in (1, 2, 3, 4, 8, 16)] == [2.4, 2.1, 2.1, 2.2, 2.2, 2.4]
    assert locality.max_waste(1, tma=False) == pytest.approx(2.4 * 0.88)
    latest = {"waste": 2.15}
    monkeypatch.setattr(locality.MONITOR, "waste", lambda idx, meta, tokens: latest["waste"])
    groups = (1, 2, 4, 8, 16)
    assert [locality.prefers_q_tile(None, None, 16, g) for g in groups] == [True, False, True, True, True]
    latest["waste"] = 2.0
    assert [locality.prefers_q_tile(None, None, 16, g, tma=False) for g in groups] == [True, False, False, False, True]
    latest["waste"] = None
    assert not locality.prefers_q_tile(None, None, 16, 1)


def order_taken(monkeypatch, waste: float, automatic: str, group: int, seed: int, **env: str) -> list[str]:
    """The loop order sparse_attention_triton runs (kernels stubbed) when the automatic order is `automatic` and
    the locality monitor's latest waste is `waste`, on 128 tokens x G heads of one or two KV heads, env set."""
    from sparsa.ops.sparse_attn import locality, triton_ops

    monkeypatch.setattr(locality, "DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(locality, "MIN_TOKENS", 64)
    monkeypatch.setattr(locality.MONITOR, "waste", lambda idx, meta, tokens: waste)
    monkeypatch.delenv("SPARSA_LOCALITY_CHECK", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    taken = []
    monkeypatch.setattr(triton_ops._SparseAttention, "apply", lambda *a: taken.append(a[-1]) or (a[0], a[0][..., 0]))
    monkeypatch.setattr(triton_ops, "automatic_loop_order", lambda *a, **kw: automatic)
    hkv = 2 if group < 16 else 1
    q, k, v, _ = make_inputs(1, 128, hkv, group, 16, torch.float32, seed=seed)
    idx = random_selection(1, 128, hkv, 4, 16, generator=torch.Generator().manual_seed(seed), device=DEVICE)
    triton_ops.sparse_attention_triton(q, k, v, idx, block_size=16, scale=0.25)
    return taken


@pytest.mark.parametrize("tma, expected", [("1", True), ("0", False)])
def test_automatic_order_threshold_follows_tma(tma, expected, monkeypatch):
    """The automatic order compares the waste against max_waste(G, tma) with tma as the q_tile forward would
    load K / V: at G = 2 a waste of 2.0 is under 2.1 (TMA) and over 2.1 x 0.88 (without)."""
    taken = order_taken(monkeypatch, 2.0, "kv_outer", 2, 95, SPARSA_Q_TILE_TMA=tma)
    assert taken == ["q_tile" if expected else "kv_outer"]


@pytest.mark.parametrize("q_outer_tma, expected", [("1", "q_outer"), ("0", "q_tile")])
def test_automatic_order_threshold_against_the_tma_query_outer_kernel(q_outer_tma, expected, monkeypatch):
    """At G = 16 where the automatic order is query-outer, a waste of 2.0 keeps the TMA query-outer kernel
    (threshold 1.9) but takes q_tile against the other query-outer forwards (threshold 2.4)."""
    taken = order_taken(monkeypatch, 2.0, "q_outer", 16, 94, SPARSA_Q_TILE_TMA="1", SPARSA_Q_OUTER_TMA=q_outer_tma)
    assert taken == [expected]


def test_locality_check_applies_only_where_measured(monkeypatch):
    """check_applies: from MIN_TOKENS tokens, head dims up to 128, blocks of up to 128 keys, on DEVICES, and
    not with SPARSA_LOCALITY_CHECK=0."""
    from sparsa.ops.sparse_attn import locality

    monkeypatch.setattr(locality, "DEVICES", ("cpu", "cuda"))
    monkeypatch.delenv("SPARSA_LOCALITY_CHECK", raising=False)
    q = torch.zeros(2048, 4, 128)
    assert locality.check_applies(q, 128, 64) and locality.check_applies(q, 128, 128)
    assert not locality.check_applies(q, 128, 256)
    assert not locality.check_applies(q, 256, 64)
    assert not locality.check_applies(q[:2047], 128, 64)
    monkeypatch.setenv("SPARSA_LOCALITY_CHECK", "0")
    assert not locality.check_applies(q, 128, 64)


def test_q_tile_tma_applies_only_where_it_can(monkeypatch):
    """list_tma: by default on CUDA devices of compute capability >= 9 only, for 16-bit rows of up to 256 bytes;
    off with SPARSA_Q_TILE_TMA=0; on with 1 for contiguous K / V whose head dim is its block width, any dtype;
    not for head dims padded to a power of two; bad values named."""
    from sparsa.ops.sparse_attn.q_tile import list_tma

    k = torch.zeros(64, 2, 32, device=DEVICE)
    half = k.half()
    monkeypatch.delenv("SPARSA_Q_TILE_TMA", raising=False)
    hopper = k.is_cuda and torch.cuda.get_device_capability(k.device)[0] >= 9
    assert list_tma(half, half) == hopper
    assert not list_tma(k, k)  # fp32: only when forced
    wide = torch.zeros(64, 2, 256, device=DEVICE, dtype=torch.float16)
    assert not list_tma(wide, wide)  # rows of 512 bytes: only when forced
    monkeypatch.setenv("SPARSA_Q_TILE_TMA", "0")
    assert not list_tma(k, k)
    monkeypatch.setenv("SPARSA_Q_TILE_TMA", "1")
    assert list_tma(k, k) and list_tma(wide, wide)
    odd = torch.zeros(64, 2, 24, device=DEVICE)
    assert not list_tma(odd, odd)
    assert not list_tma(k, k[:, :, :16])  # a strided view
    monkeypatch.setenv("SPARSA_Q_TILE_TMA", "yes")
    with pytest.raises(ValueError, match="SPARSA_Q_TILE_TMA"):
        list_tma(k, k)


def test_q_tile_backward_rule(monkeypatch):
    from sparsa.ops.sparse_attn.triton_ops import Q_TILE_MAX_TOKEN_HEADS, q_tile_backward_order

    assert q_tile_backward_order(4096, 3) == "q_tile"  # SmolLM2-135M at 4K tokens: its own backward
    assert q_tile_backward_order(Q_TILE_MAX_TOKEN_HEADS + 1, 1) == "kv_outer"
    monkeypatch.setenv("SPARSA_Q_TILE_BACKWARD", "q_tile")
    assert q_tile_backward_order(65536, 8) == "q_tile"


def test_pooled_selection_helper():
    """Forced blocks, ascending rows, and each tile's free blocks from one pool of `pool` blocks."""
    idx = pooled_selection(640, 2, 8, 16, 6, tile=64, generator=torch.Generator().manual_seed(0))
    assert idx.shape == (1, 640, 2, 8) and idx.dtype == torch.int32
    cur = torch.arange(640) // 16
    for t in (0, 17, 200, 639):
        valid = idx[0, t, 0][idx[0, t, 0] >= 0]
        assert torch.all(valid[1:] > valid[:-1]) and int(valid[0]) == 0 and int(valid[-1]) == int(cur[t])
        assert len(valid) == min(8, int(cur[t]) + 1)
    for t0 in range(256, 640, 64):  # pools are full from here (blocks 1 .. 14 usable): 6 free blocks each
        for h in range(2):
            rows = idx[0, t0 : t0 + 64, h]
            own = cur[t0 : t0 + 64, None]
            free = rows[(rows > 0) & (rows < own - 1)]
            assert len(set(free.tolist())) == 6  # every token takes 5 of the same 6
    with pytest.raises(ValueError, match="pool"):
        pooled_selection(64, 1, 4, 16, 0)
    with pytest.raises(ValueError, match="tile"):
        pooled_selection(64, 1, 4, 16, 2, tile=0)


def test_loop_order_from_the_environment(monkeypatch):
    """SPARSA_LOOP_ORDER forces the order of calls that pass none."""
    from sparsa.ops.sparse_attn import triton_ops

    calls = []
    real = triton_ops.q_tile_forward
    monkeypatch.setattr(triton_ops, "q_tile_forward", lambda *a: calls.append(1) or real(*a))
    q, k, v, _ = make_inputs(1, 48, 1, 2, 16, torch.float32, seed=95)
    idx = random_selection(1, 48, 1, 3, 16, generator=torch.Generator().manual_seed(95), device=DEVICE)
    sparsa.sparse_attention(q, k, v, idx, block_size=16)
    assert not calls  # automatic choice: q_outer at this length
    monkeypatch.setenv("SPARSA_LOOP_ORDER", "q_tile")
    sparsa.sparse_attention(q, k, v, idx, block_size=16)
    assert calls == [1]
    monkeypatch.setenv("SPARSA_LOOP_ORDER", "tiles")
    with pytest.raises(ValueError, match="SPARSA_LOOP_ORDER"):
        sparsa.sparse_attention(q, k, v, idx, block_size=16)


def test_q_tile_forward_with_the_kv_outer_backward(monkeypatch):
    """SPARSA_Q_TILE_BACKWARD=kv_outer: the q_tile forward's gradients from the KV-outer backward (which builds
    its pair index itself), packed documents; a bad value is a ValueError naming the setting."""
    from sparsa.ops.sparse_attn import triton_ops

    calls = []
    real = triton_ops.kv_outer_backward
    monkeypatch.setattr(triton_ops, "kv_outer_backward", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("SPARSA_Q_TILE_BACKWARD", "kv_outer")
    cu = torch.tensor([0, 70, 112], dtype=torch.int32, device=DEVICE)
    q, k, v, do = make_inputs(1, 112, 2, 2, 16, torch.float32, seed=93)
    idx = random_selection(1, 112, 2, 4, 16, cu_seqlens=cu.cpu(), generator=torch.Generator().manual_seed(93))
    check(q, k, v, do, idx.to(DEVICE), 16, cu_seqlens=cu, orders=("q_tile",))
    assert calls
    monkeypatch.setenv("SPARSA_Q_TILE_BACKWARD", "tiles")
    with pytest.raises(ValueError, match="SPARSA_Q_TILE_BACKWARD"):
        run(lambda a, b, c: sparsa.sparse_attention(a, b, c, idx.to(DEVICE), block_size=16, loop_order="q_tile",
                                                    return_lse=True), q, k, v, do)


def test_automatic_loop_order_rule():
    """The measured crossovers: q_outer for G >= 16 and short inputs, q_tile for small problems at head dim
    <= 64 (SmolLM2's shape), kv_outer otherwise."""
    from sparsa.ops.sparse_attn.triton_ops import choose_loop_order

    assert choose_loop_order(16, 65536, 128, 2) == "q_outer"
    # G = 16 below 20480 tokens: KV-outer where its MAIN is the Gluon kernel (Hopper), query-outer elsewhere
    assert choose_loop_order(16, 8192, 128, 2) == "q_outer"
    assert choose_loop_order(16, 8192, 128, 2, gluon_main=True) == "kv_outer"
    assert choose_loop_order(16, 32768, 128, 2, gluon_main=True) == "q_outer"
    assert choose_loop_order(16, 16384, 128, 2, gluon_main=True) == "kv_outer"  # H100 session 26 crossover
    assert choose_loop_order(16, 24576, 128, 2, gluon_main=True) == "q_outer"
    # ... unless the query-outer forward is the TMA kernel (session 29): query-outer at every size
    for n in (2048, 8192, 16384, 32768):
        assert choose_loop_order(16, n, 128, 2, gluon_main=True, q_outer_tma=True) == "q_outer"
    assert choose_loop_order(16, 8192, 128, 2, True, large_group_kv_outer=True, q_outer_tma=True) == "kv_outer"
    assert choose_loop_order(8, 8192, 128, 4, gluon_main=True, q_outer_tma=True) == "kv_outer"
    assert choose_loop_order(16, 1024, 128, 2, gluon_main=True) == "q_outer"  # few queries
    assert choose_loop_order(4, 1024, 128, 8) == "q_outer"
    assert choose_loop_order(3, 4096, 64, 3) == "q_tile"  # SmolLM2-135M at 4K tokens
    assert choose_loop_order(3, 8192, 64, 3) == "kv_outer"  # larger than measured
    assert choose_loop_order(3, 4096, 128, 3) == "kv_outer"
    assert choose_loop_order(4, 8192, 128, 8) == "kv_outer"
    assert choose_loop_order(4, 8192, 128) == "kv_outer"
    # faster memory (the H200's tuning): G = 16 takes KV-outer at every size from 2048 tokens
    for n in (2048, 8192, 32768, 131072):
        assert choose_loop_order(16, n, 128, 2, large_group_kv_outer=True) == "kv_outer"
    assert choose_loop_order(16, 1024, 128, 2, large_group_kv_outer=True) == "q_outer"
    assert choose_loop_order(4, 8192, 128, 8, large_group_kv_outer=True) == "kv_outer"


def test_device_tuning_table(monkeypatch):
    """device_tuning: the H200 row by CUDA device name (KV-outer at G = 16, thresholds x 0.85), the H100 row for
    other GPUs and CPU tensors; SPARSA_DEVICE_TUNING forces a row and rejects other values by name."""
    from sparsa.ops.sparse_attn import device_tuning as dt
    from sparsa.ops.sparse_attn import locality

    monkeypatch.delenv("SPARSA_DEVICE_TUNING", raising=False)
    assert dt.device_tuning(torch.device("cpu")) == dt.TUNINGS["h100"]
    assert dt._tuning_for_name("NVIDIA H200") == "h200"
    assert dt._tuning_for_name("NVIDIA H100 80GB HBM3") == "h100"
    assert dt._tuning_for_name("NVIDIA A100-SXM4-80GB") == "h100"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    h200 = dt.device_tuning(torch.device("cuda", 0))
    assert h200.large_group_kv_outer and h200.waste_factor == 0.85
    # the H200's measured crossovers (G = 1: 2.18 / 2.22, G = 4: 1.95 / 2.06) sit above its thresholds
    assert locality.max_waste(1, factor=h200.waste_factor) == pytest.approx(2.04)
    assert locality.max_waste(4, factor=h200.waste_factor) == pytest.approx(1.87)
    # 8K G = 16 random selections (waste 2.36) take q_tile on the H100 against the one-token tiles / KV-outer, not
    # on the H200 (where KV-outer won), and not against the TMA query-outer kernel (its threshold 1.9)
    assert locality.max_waste(16) > 2.36 > locality.max_waste(16, factor=h200.waste_factor)
    assert locality.max_waste(16, q_outer_tma=True) == pytest.approx(1.9)
    assert locality.max_waste(16, tma=False, q_outer_tma=True) == pytest.approx(1.9)
    assert locality.max_waste(4, q_outer_tma=True) == locality.max_waste(4)  # no other group measured
    monkeypatch.setenv("SPARSA_DEVICE_TUNING", "h100")
    assert dt.device_tuning(torch.device("cuda", 0)) == dt.TUNINGS["h100"]
    monkeypatch.setenv("SPARSA_DEVICE_TUNING", "h200")
    assert dt.device_tuning(torch.device("cpu")) == dt.TUNINGS["h200"]
    monkeypatch.setenv("SPARSA_DEVICE_TUNING", "b200")
    with pytest.raises(ValueError, match="SPARSA_DEVICE_TUNING"):
        dt.device_tuning(torch.device("cpu"))


def test_device_tuning_reaches_the_automatic_order(monkeypatch):
    """The call's device tuning reaches choose_loop_order (large_group_kv_outer) and the locality check's
    threshold (prefers_q_tile's factor)."""
    from sparsa.ops.sparse_attn import locality, triton_ops

    seen, factors = [], []
    monkeypatch.setattr(triton_ops, "choose_loop_order", lambda *a: seen.append(a) or "kv_outer")
    monkeypatch.setattr(locality, "check_applies", lambda *a: True)
    monkeypatch.setattr(locality, "prefers_q_tile", lambda *a, **kw: factors.append(kw["factor"]) or False)
    monkeypatch.setenv("SPARSA_DEVICE_TUNING", "h200")
    q, k, v, _ = make_inputs(2, 24, 2, 3, 16, torch.float32, seed=97)
    idx = random_selection(2, 24, 2, 3, 8, generator=torch.Generator().manual_seed(97), device=DEVICE)
    sparsa.sparse_attention(q, k, v, idx, block_size=8)
    assert seen[-1][-2] is True and factors == [0.85]  # (..., large_group_kv_outer, q_outer_tma)


def test_automatic_choice_sees_the_call_shape(monkeypatch):
    """sparse_attention_triton passes (G, tokens, max(D, Dv), Hkv, whether the KV-outer MAIN is the Gluon kernel:
    never for these fp32 inputs, the device tuning's large_group_kv_outer: the H100's on CPU) to choose_loop_order."""
    from sparsa.ops.sparse_attn import triton_ops

    seen = []
    real = triton_ops.choose_loop_order
    monkeypatch.setattr(triton_ops, "choose_loop_order", lambda *a: seen.append(a) or real(*a))
    q, k, v, _ = make_inputs(2, 24, 2, 3, 16, torch.float32, dim_v=32, seed=96)
    idx = random_selection(2, 24, 2, 3, 8, generator=torch.Generator().manual_seed(96), device=DEVICE)
    sparsa.sparse_attention(q, k, v, idx, block_size=8)
    assert seen == [(3, 48, 32, 2, False, False, False)]


def test_local_block_table_definition():
    """MAIN's skip table: per token its document's block 0 and own block (global ids), (-2, -2) where its
    merge tile (8 tokens) crosses a document boundary; built once per layout."""
    from sparsa.ops.sparse_attn.index import doc_meta
    from sparsa.ops.sparse_attn.kv_outer import local_block_table

    lens, bs, tile = [13, 3, 20], 4, 8
    meta = doc_meta(1, sum(lens), torch.tensor([0, 13, 16, 36]), bs, "cpu")
    table = local_block_table(meta, bs, tile)
    starts, bases = [0, 13, 16], [0, 4, 5]  # document starts; global id of each document's block 0
    for t in range(sum(lens)):
        d = max(i for i in range(3) if starts[i] <= t)
        t0, t1 = t // tile * tile, min(t // tile * tile + tile, sum(lens)) - 1
        one_doc = all(starts[d] <= x < starts[d] + lens[d] for x in (t0, t1))
        want = [bases[d], bases[d] + (t - starts[d]) // bs] if one_doc else [-2, -2]
        assert table[t].tolist() == want, t
    assert local_block_table(meta, bs, tile) is table


def test_kv_local_setting_is_checked(monkeypatch):
    from sparsa.ops.sparse_attn import kv_outer as kv_mod

    monkeypatch.setenv("SPARSA_KV_LOCAL", "yes")
    with pytest.raises(ValueError, match="SPARSA_KV_LOCAL"):
        kv_mod.local_fusion()


def test_kv_bwd_keys_setting(monkeypatch):
    from sparsa.ops.sparse_attn import backward as bwd_mod

    monkeypatch.delenv("SPARSA_KV_BWD_KEYS", raising=False)
    # tuned default: no software pipelining for the gathered-rows layout at G <= 4 (head dim 128, block 64)
    assert bwd_mod.bwd_config(4, 128, 64, 65536) == (128, 8, {"num_stages": 1}, False)
    assert bwd_mod.bwd_config(2, 128, 64, 8192) == (128, 8, {"num_stages": 1}, False)
    # tuned default (BWD_TUNED): G = 1 takes 64 rows / 4 warps, two stages
    assert bwd_mod.bwd_config(1, 128, 64, 8192) == (64, 4, {"num_stages": 2}, False)
    assert bwd_mod.bwd_config(1, 64, 64, 8192) == (64, 4, {}, False)
    assert bwd_mod.bwd_config(4, 64, 64, 65536)[2] == {}
    assert bwd_mod.bwd_config(8, 128, 64, 8192)[2] == {}
    # tuned default: keys as rows for G = 8 at head dim 128, block 64 from 16K tokens only
    assert bwd_mod.bwd_config(8, 128, 64, 16384) == (64, 4, {}, True)
    assert bwd_mod.bwd_config(8, 128, 64, 8192)[3] is False
    assert bwd_mod.bwd_config(8, 64, 64, 65536)[3] is False
    assert bwd_mod.bwd_config(8, 128, 32, 65536)[3] is False
    monkeypatch.setenv("SPARSA_KV_BWD_KEYS", "1")
    assert bwd_mod.bwd_config(4, 128, 64, 2048) == (64, 4, {}, True)
    monkeypatch.setenv("SPARSA_KV_BWD_KEYS", "0")
    assert bwd_mod.bwd_config(8, 128, 64, 65536) == (128, 8, {}, False)
    monkeypatch.setenv("SPARSA_KV_BWD_KEYS", "2")
    with pytest.raises(ValueError, match="SPARSA_KV_BWD_KEYS"):
        bwd_mod.keys_as_rows()


REAL_QK = os.path.join(os.path.dirname(__file__), "..", "data", "smollm2_qk_t192_layer12.safetensors")


def test_real_activations_and_select_blocks_selection(monkeypatch):
    """Queries and keys of SmolLM2-135M (layer 12, the first 96 of 192 Shakespeare tokens;
    scripts/real_activations.py) with the SSA selection of sparsa.select_blocks (block 16, top-4 of 6
    blocks, block 0 and 2 local blocks forced): G = 3, head dim 64, both loop orders with the fused local
    blocks, outputs and gradients against the float64 reference."""
    from safetensors.torch import load_file

    monkeypatch.setenv("SPARSA_KV_LOCAL", "1")
    tensors = load_file(REAL_QK)
    q, k = (tensors[n][:96].float()[None] for n in ("q.12", "k.12"))  # [1, 96, 9 | 3, 64]
    gen = torch.Generator().manual_seed(80)
    v, do = torch.randn(k.shape, generator=gen), torch.randn(q.shape, generator=gen)
    idx = sparsa.select_blocks(q, k, block_size=16, topk=4, init_blocks=1, local_blocks=2)
    cur = torch.arange(96) // 16
    scored = (idx[0] > 0) & (idx[0] < (cur - 1)[:, None, None])
    assert scored.any()  # past the forced blocks the selection follows the scores
    check(*(x.to(DEVICE) for x in (q, k, v, do, idx)), 16)


def test_random_selection_helper():
    idx = random_selection(1, 300, 2, 6, 16, generator=torch.Generator().manual_seed(0))
    cur = torch.arange(300) // 16
    for t in (0, 17, 40, 299):
        row = idx[0, t, 0]
        valid = row[row >= 0]
        assert torch.all(valid[1:] > valid[:-1]) and int(valid[0]) == 0 and int(valid[-1]) == int(cur[t])
        if cur[t] >= 1:
            assert int(cur[t]) - 1 in valid.tolist()
        assert len(valid) == min(6, int(cur[t]) + 1)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("group", [1, 4, 5, 16])
def test_gpu_bf16_matches_reference(group):
    hkv = 32 // group if group <= 16 else 1
    q, k, v, do = make_inputs(1, 2048, hkv, group, 128, torch.bfloat16, seed=group)
    idx = random_selection(1, 2048, hkv, 16, 64, generator=torch.Generator().manual_seed(group), device=DEVICE)
    check(q, k, v, do, idx, 64, tol=2e-2)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_gpu_bf16_one_token_tiles(monkeypatch):
    """The query-outer order at G = 16 in bf16 on one-token tiles (automatic on Hopper behind the TMA query-outer
    kernel, which is switched off here; forced elsewhere), large logits, against the float64 reference."""
    from sparsa.ops.sparse_attn import triton_ops

    monkeypatch.setenv("SPARSA_Q_OUTER_TMA", "0")
    if torch.cuda.get_device_capability()[0] < 9:
        monkeypatch.setenv("SPARSA_ONE_TOKEN_TILES", "1")
    tiles = []
    real = triton_ops.q_tile_forward
    monkeypatch.setattr(triton_ops, "q_tile_forward", lambda *a, **kw: tiles.append(kw.get("tile")) or real(*a, **kw))
    q, k, v, do = make_inputs(1, 4096, 2, 16, 128, torch.bfloat16, logit=40.0, seed=99)
    idx = random_selection(1, 4096, 2, 16, 64, generator=torch.Generator().manual_seed(99), device=DEVICE)
    check(q, k, v, do, idx, 64, orders=("q_outer",), tol=2e-2)
    assert tiles == [(16, 1, 2)]


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("group, skip", [(4, False), (16, False), (16, True)])
def test_gpu_bf16_query_outer_tma(group, skip, monkeypatch):
    """The query-outer kernel with K / V by TMA (SPARSA_Q_OUTER_TMA=1; Hopper) in bf16 with large logits and a
    sequence that ends inside a block, against the float64 reference; with and without TMA_SKIP_PADDING."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability 9+")
    from sparsa.ops.sparse_attn import q_outer as qo_mod
    from sparsa.ops.sparse_attn import triton_ops

    monkeypatch.setenv("SPARSA_Q_OUTER_TMA", "1")
    monkeypatch.setattr(qo_mod, "TMA_SKIP_PADDING", skip)
    monkeypatch.setattr(triton_ops, "q_tile_forward", None)  # the one-token tiles must not run
    n, hkv = 4000, 32 // group
    q, k, v, do = make_inputs(1, n, hkv, group, 128, torch.bfloat16, logit=40.0, seed=100 + group)
    idx = random_selection(1, n, hkv, 16, 64, generator=torch.Generator().manual_seed(group), device=DEVICE)
    check(q, k, v, do, idx, 64, orders=("q_outer",), tol=2e-2)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("dq_tma", [False, True])
@pytest.mark.parametrize("group", [1, 4, 16])
def test_gpu_bf16_hybrid_backward(group, dq_tma, monkeypatch):
    """SPARSA_Q_TILE_BACKWARD=hybrid in bf16 (on Hopper the Gluon dK/dV without its dQ partials; q_tile's dQ kernel
    with K / V by TMA or not) on pooled selections, against the float64 reference."""
    from sparsa.ops.sparse_attn import q_tile_backward as qtb_mod

    monkeypatch.setenv("SPARSA_Q_TILE_BACKWARD", "hybrid")
    monkeypatch.setattr(qtb_mod, "DQ_TMA", dq_tma)
    hkv = 32 // group
    q, k, v, do = make_inputs(1, 2048, hkv, group, 128, torch.bfloat16, seed=40 + group)
    idx = pooled_selection(2048, hkv, 16, 64, 20, generator=torch.Generator().manual_seed(group), device=DEVICE)
    check(q, k, v, do, idx, 64, orders=("q_tile",), tol=2e-2)
