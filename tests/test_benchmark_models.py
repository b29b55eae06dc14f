"""CPU checks of the benchmarks' analytic models (benchmarks/sparse_attention.py)."""
import pytest
import torch

from benchmarks import sparse_attention as bench_sa
from sparsa.ops.sparse_attn.index import random_selection


def test_traffic_floor_counts_pairs_and_local_pairs():
    n, group, bs = 300, 2, bench_sa.BS
    idx = random_selection(1, n, 3, 4, bs, generator=torch.Generator().manual_seed(0))
    pairs = local = 0
    for t in range(n):
        own = t // bs
        for h in range(3):
            row = [int(b) for b in idx[0, t, h] if b >= 0]
            pairs += len(row)
            local += sum(b in (0, own, own - 1) for b in row)
    fwd, fwd_local, bwd = bench_sa.traffic_floor_gb(idx, n, group)
    row_bytes = bench_sa.D * 2
    assert fwd * 1e9 == pytest.approx(pairs * group * 3 * row_bytes, rel=1e-12)
    assert fwd_local * 1e9 == pytest.approx((pairs - local) * group * 3 * row_bytes + n * bench_sa.HQ * row_bytes, rel=1e-12)
    assert bwd * 1e9 == pytest.approx(pairs * group * (4 * row_bytes + 8), rel=1e-12)
    assert 0 < local < pairs
    split = bench_sa.traffic_floor_gb(idx, n, group, split=True)[1]  # row read, o written and read back
    assert split * 1e9 == pytest.approx((pairs - local) * group * 3 * row_bytes + 3 * n * bench_sa.HQ * row_bytes,
                                        rel=1e-12)


def test_mean_union_of_tiles():
    from scripts.real_activations import mean_union

    idx = torch.tensor([[[0, 1]], [[0, 2]], [[0, -1]], [[3, 3]]], dtype=torch.int32)  # [T=4, Hkv=1, K=2]
    # tiles of 2 tokens: {0, 1, 2} from 4 pairs, {0, 3} from 3 pairs (-1 ignored, repeats counted as pairs)
    union, pairs = mean_union(idx, 2)
    assert union == 2.5 and pairs == (4 / 3 + 3 / 2) / 2


def test_forward_bytes_model():
    from scripts.real_activations import forward_bytes_per_row

    idx = torch.tensor([[[0, 1]], [[0, 2]], [[0, -1]], [[3, 3]]], dtype=torch.int32)
    kv, qt = forward_bytes_per_row(idx, tile=2, block=16, head_dim=64, group=2)
    assert kv == 3 * 128 * 7 / 4  # 7 valid slots over 4 tokens
    assert qt == 2.5 * 16 * 2 * 128 / (2 * 2) + 2 * 128  # mean union 2.5 blocks of K and V per 2 tokens x 2 heads
