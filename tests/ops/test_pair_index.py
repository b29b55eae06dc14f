"""The block -> token pair index of the KV-outer kernels (sparsa/ops/sparse_attn/index.py) against its
definition, with the 16-bit and the 32-bit sort keys."""
import pytest
import torch

from sparsa.ops.sparse_attn.index import build_pair_index, doc_meta


def _expected_groups(idx, meta, block_size, h0, n_heads):
    """{group: [tokens in order]} from the definition: a slot is valid when >= 0, its block starts at or
    before the token (positions local to the document) and it does not repeat the previous slot."""
    groups = {}
    docstart, blockbase = meta.tok_docstart.tolist(), meta.tok_blockbase.tolist()
    for hl in range(n_heads):
        for t in range(idx.shape[0]):
            prev = None
            for c in idx[t, h0 + hl].tolist():
                if c >= 0 and c * block_size <= t - docstart[t] and c != prev:
                    groups.setdefault(hl * meta.n_blocks + blockbase[t] + c, []).append(t)
                prev = c
    return groups


def _check(idx, meta, block_size, h0, n_heads):
    index = build_pair_index(idx, meta, block_size, h0, n_heads)
    expected = _expected_groups(idx, meta, block_size, h0, n_heads)
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


@pytest.mark.parametrize("packed", [False, True])
def test_pair_index_matches_definition(packed):
    g = torch.Generator().manual_seed(3)
    block_size, n_heads_kv, topk = 4, 3, 5
    if packed:
        cu = torch.tensor([0, 7, 30, 41], dtype=torch.int32)
        meta = doc_meta(1, 41, cu, block_size, "cpu")
    else:
        meta = doc_meta(2, 23, None, block_size, "cpu")
    n_tokens = meta.n_tokens
    # random blocks incl. future ones (invalid), -1 padding and repeats of the previous slot
    idx = torch.randint(-1, 7, (n_tokens, n_heads_kv, topk), generator=g, dtype=torch.int32)
    idx[:, :, 2] = idx[:, :, 1]
    _check(idx, meta, block_size, 0, n_heads_kv)
    _check(idx, meta, block_size, 1, 2)  # a head slice


def test_pair_index_with_32bit_keys():
    """More than 2^15 groups: the sort key is int32 (the path of long sequences and many heads)."""
    g = torch.Generator().manual_seed(4)
    block_size, n_tokens = 1, 17000
    meta = doc_meta(1, n_tokens, None, block_size, "cpu")
    assert 2 * meta.n_blocks >= 2**15
    idx = torch.randint(0, n_tokens, (n_tokens, 2, 2), generator=g, dtype=torch.int32)
    idx[:, :, 0] = torch.arange(n_tokens, dtype=torch.int32)[:, None]  # the token's own block: always valid
    index = build_pair_index(idx, meta, block_size, 0, 2)
    counts, gstart, toks = index.counts, index.gstart, index.toks
    assert int(counts.sum()) == int((index.pos >= 0).sum())
    # every token's own block holds exactly that token first (sorted by group, then token)
    own = torch.arange(n_tokens)
    assert (toks[gstart[own]] == own.to(torch.int32)).all()
    assert (toks[gstart[meta.n_blocks + own]] == own.to(torch.int32)).all()


def test_pair_index_ignores_out_of_range_blocks():
    """Blocks far beyond the sequence (unchecked on CUDA) are invalid slots, not an overflowed start."""
    meta = doc_meta(1, 8, None, 4, "cpu")
    idx = torch.tensor([[[0, 2**30, 2**31 - 1]]] * 8, dtype=torch.int32)
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
