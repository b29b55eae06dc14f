"""The block -> token pair index of the KV-outer kernels (sparsa/ops/sparse_attn/index.py) against its
definition (both implementations), with the 16-bit and the 32-bit sort keys, and the Triton index kernels
(index_triton.py) against the PyTorch path element for element."""
import pytest
import torch

from sparsa.ops.sparse_attn import index as index_mod
from sparsa.ops.sparse_attn import index_triton
from sparsa.ops.sparse_attn.index import build_pair_index, doc_meta

# the index kernels run on the GPU when there is one, else in the Triton interpreter (tests/conftest.py)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=index_mod.PAIR_INDEX_BACKENDS)
def pair_index_backend(request, monkeypatch):
    """Runs a test with each implementation behind build_pair_index / work_list."""
    monkeypatch.setenv("SPARSA_PAIR_INDEX", request.param)
    return request.param


def test_unknown_pair_index_backend_is_a_value_error(monkeypatch):
    monkeypatch.setenv("SPARSA_PAIR_INDEX", "cuda")
    with pytest.raises(ValueError, match="SPARSA_PAIR_INDEX"):
        index_mod.pair_index_backend()


def _expected_groups(idx, meta, block_size, h0, n_heads, skip_local=False):
    """{group: [tokens in order]} from the definition: a slot is valid when >= 0, its block starts at or
    before the token (positions local to the document) and no earlier slot of the row holds the same block;
    with skip_local also not the document's block 0 nor the token's own or previous block."""
    groups = {}
    docstart, blockbase = meta.tok_docstart.tolist(), meta.tok_blockbase.tolist()
    for hl in range(n_heads):
        for t in range(idx.shape[0]):
            seen = set()
            own = (t - docstart[t]) // block_size
            for c in idx[t, h0 + hl].tolist():
                local = skip_local and c in (0, own, own - 1)
                if c >= 0 and c * block_size <= t - docstart[t] and c not in seen and not local:
                    groups.setdefault(hl * meta.n_blocks + blockbase[t] + c, []).append(t)
                seen.add(c)
    return groups


def _check(idx, meta, block_size, h0, n_heads, skip_local=False):
    index = build_pair_index(idx, meta, block_size, h0, n_heads, skip_local)
    assert index.skip_local == skip_local
    expected = _expected_groups(idx, meta, block_size, h0, n_heads, skip_local)
    counts, gstart, toks = index.counts.tolist(), index.gstart.tolist(), index.toks.tolist()
    assert len(counts) == n_heads * meta.n_blocks
    for g, n in enumerate(counts):
        assert toks[gstart[g] : gstart[g] + n] == expected.get(g, []), g  # grouped, in token order
    n_valid = sum(counts)
    pos = index.pos
    valid = pos >= 0
    assert int(valid.sum()) == n_valid
    assert sorted(pos[valid].tolist()) == list(range(n_valid))  # a permutation of the sorted positions
    heads, tokens, _ = torch.nonzero(valid, as_tuple=True)
    assert (index.toks[pos[valid].long()] == tokens.to(torch.int32)).all()
    assert heads.max().item() < n_heads if n_valid else True


@pytest.mark.usefixtures("pair_index_backend")
@pytest.mark.parametrize("packed", [False, True])
def test_pair_index_matches_definition(packed):
    g = torch.Generator().manual_seed(3)
    block_size, n_heads_kv, topk = 4, 3, 5
    if packed:
        cu = torch.tensor([0, 7, 30, 41], dtype=torch.int32)
        meta = doc_meta(1, 41, cu, block_size, DEV)
    else:
        meta = doc_meta(2, 23, None, block_size, DEV)
    n_tokens = meta.n_tokens
    # random blocks incl. future ones (invalid), -1 padding, repeats of the previous and of earlier slots
    idx = torch.randint(-1, 7, (n_tokens, n_heads_kv, topk), generator=g, dtype=torch.int32)
    idx[:, :, 2] = idx[:, :, 1]
    idx[::2, :, 4] = idx[::2, :, 0]
    idx = idx.to(DEV)
    _check(idx, meta, block_size, 0, n_heads_kv)
    _check(idx, meta, block_size, 1, 2)  # a head slice
    _check(idx, meta, block_size, 0, n_heads_kv, skip_local=True)
    _check(idx, meta, block_size, 1, 2, skip_local=True)


@pytest.mark.usefixtures("pair_index_backend")
def test_pair_index_with_32bit_keys():
    """More than 2^15 groups: the sort key is int32 (the path of long sequences and many heads)."""
    g = torch.Generator().manual_seed(4)
    block_size, n_tokens = 1, 17000
    meta = doc_meta(1, n_tokens, None, block_size, DEV)
    assert 2 * meta.n_blocks >= 2**15
    idx = torch.randint(0, n_tokens, (n_tokens, 2, 2), generator=g, dtype=torch.int32)
    idx[:, :, 0] = torch.arange(n_tokens, dtype=torch.int32)[:, None]  # the token's own block: always valid
    index = build_pair_index(idx.to(DEV), meta, block_size, 0, 2)
    counts, gstart, toks = index.counts.cpu(), index.gstart.cpu(), index.toks.cpu()
    assert int(counts.sum()) == int((index.pos >= 0).sum())
    # every token's own block holds exactly that token first (sorted by group, then token)
    own = torch.arange(n_tokens)
    assert (toks[gstart[own]] == own.to(torch.int32)).all()
    assert (toks[gstart[meta.n_blocks + own]] == own.to(torch.int32)).all()


@pytest.mark.usefixtures("pair_index_backend")
def test_pair_index_ignores_out_of_range_blocks():
    """Blocks far beyond the sequence (unchecked on CUDA) are invalid slots, not an overflowed start."""
    meta = doc_meta(1, 8, None, 4, DEV)
    idx = torch.tensor([[[0, 2**30, 2**31 - 1]]] * 8, dtype=torch.int32, device=DEV)
    index = build_pair_index(idx, meta, 4, 0, 1)
    assert index.pos[0, :, 1:].eq(-1).all() and int(index.counts.sum()) == 8


def test_uniform_doc_meta_is_cached_and_equals_the_packed_layout():
    a = doc_meta(3, 10, None, 4, "cpu")
    assert doc_meta(3, 10, None, 4, torch.device("cpu")) is a  # cached: no new tensors per call
    packed = doc_meta(1, 30, torch.tensor([0, 10, 20, 30], dtype=torch.int32), 4, "cpu")
    assert packed is not a and (a.n_tokens, a.n_blocks) == (packed.n_tokens, packed.n_blocks) == (30, 9)
    for name in ("tok_docstart", "tok_blockbase", "blk_start", "blk_len"):
        assert torch.equal(getattr(a, name), getattr(packed, name)), name
    assert a.blk_len.tolist() == [4, 4, 2] * 3 and a.blk_start.tolist()[:4] == [0, 4, 8, 10]


def test_tile_tables_of_selection_and_compressed_attention_are_cached():
    """The per-tile tables are built once per document layout (their host-to-device copy would wait for
    the device on every call) and are read-only tuples."""
    pytest.importorskip("triton")
    from sparsa.ops.compress import triton_attention
    from sparsa.ops.select import triton_select

    a = triton_select._tiles(((0, 40),), ((0, 9),), 16, torch.device("cpu"))
    assert triton_select._tiles(((0, 40),), ((0, 9),), 16, torch.device("cpu")) is a and isinstance(a, tuple)
    assert a[0].tolist() == [0, 16, 32] and a[4].tolist() == [9, 9, 9]
    docs = ((0, 10, 0, 3), (10, 20, 3, 5))
    b = triton_attention._tiles(docs, 8, False, torch.device("cpu"))
    assert triton_attention._tiles(docs, 8, False, torch.device("cpu")) is b
    assert b[0].tolist() == [0, 8, 0, 8, 16] and b[1].tolist() == [0, 0, 10, 10, 10]


def _assert_identical(a, b, name):
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name


def _compare_with_reference(idx, meta, block_size, h0, n_heads, per_items=(1, 2, 3, 7), skip_local=False):
    new = index_triton.build_pair_index_triton(idx, meta, block_size, h0, n_heads, skip_local)
    ref = index_mod._build_pair_index_torch(idx, meta, block_size, h0, n_heads, skip_local)
    assert (new.h0, new.n_heads, new.n_pairs_max) == (ref.h0, ref.n_heads, ref.n_pairs_max)
    for name in ("counts", "gstart", "toks", "pos"):
        _assert_identical(getattr(new, name), getattr(ref, name), name)
    assert int(ref.counts.sum()) > 0
    split_groups = 0
    for per_item in per_items:
        for with_slots in (False, True):
            work, n_slots = index_triton.work_list_triton(new, per_item, with_slots)
            ref_work, ref_slots = index_mod._work_list_torch(ref, per_item, with_slots)
            _assert_identical(work, ref_work, f"work per_item={per_item} with_slots={with_slots}")
            assert n_slots == ref_slots
        split = index_triton.group_split_info_triton(new, per_item)
        _assert_identical(split, index_mod._group_split_info_torch(ref, per_item), f"split per_item={per_item}")
        # both tables from one item cumsum (the dK/dV kernels' call) equal the separate ones
        work, n_slots, both_split = index_triton.split_work_list_triton(new, per_item)
        _assert_identical(work, index_mod._work_list_torch(ref, per_item, True)[0], f"split work per_item={per_item}")
        _assert_identical(both_split, split, f"split table per_item={per_item}")
        split_groups += int((split[:, 0] > 0).sum())
    assert split_groups > 0  # some groups are cut into several items


def _random_idx(n_tokens, n_heads_kv, topk, high, seed, dtype=torch.int32):
    """-1 padding, future and out-of-range blocks, repeats of the previous and of earlier slots (unsorted rows)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, high, (n_tokens, n_heads_kv, topk), generator=g, dtype=dtype)
    idx[::3, :, 2] = idx[::3, :, 1]  # repeats
    idx[1::4, :, topk - 1] = idx[1::4, :, 0]  # a repeat of an earlier, non-adjacent slot (topk >= 3)
    idx[::5, :, 0] = 0  # a hot block (groups cut into several work items)
    idx[7::11, :, 3] = 2**31 - 1 if dtype == torch.int32 else 2**40  # far out of range
    return idx


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_kernels_equal_the_pytorch_reference(packed, dtype):
    block_size, n_heads_kv, topk = 4, 3, 6
    if packed:
        meta = doc_meta(1, 90, torch.tensor([0, 7, 30, 41, 90], dtype=torch.int32), block_size, DEV)
    else:
        meta = doc_meta(2, 45, None, block_size, DEV)
    idx = _random_idx(meta.n_tokens, n_heads_kv, topk, 14, seed=5 + packed, dtype=dtype).to(DEV)
    _compare_with_reference(idx, meta, block_size, 0, n_heads_kv)
    _compare_with_reference(idx, meta, block_size, 1, 2)  # a head slice
    _compare_with_reference(idx, meta, block_size, 2, 1)
    _compare_with_reference(idx, meta, block_size, 0, n_heads_kv, per_items=(1, 2), skip_local=True)


def test_kernels_equal_the_pytorch_reference_with_32bit_keys():
    meta = doc_meta(1, 3000, torch.tensor([0, 1234, 3000], dtype=torch.int32), 1, DEV)
    assert 11 * meta.n_blocks >= 2**15
    idx = _random_idx(meta.n_tokens, 12, 4, 3000, seed=9).to(DEV)
    index = index_triton.build_pair_index_triton(idx, meta, 1, 1, 11)
    assert index.gstart.numel() == 11 * meta.n_blocks
    _compare_with_reference(idx, meta, 1, 1, 11, per_items=(5,))


def test_wide_pos_kernel_path(monkeypatch):
    """The int64 division path of more than 2^31 slots, forced on a small input."""
    meta = doc_meta(1, 50, None, 4, DEV)
    monkeypatch.setattr(index_triton, "WIDE_PAIRS", 0)
    _compare_with_reference(_random_idx(50, 2, 5, 14, seed=11).to(DEV), meta, 4, 0, 2)
