"""The gather probe of scripts/gather_floor.py reads exactly the blocks it counts (Triton interpreter, CPU)."""
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
gather_floor = pytest.importorskip("scripts.gather_floor")
from sparsa.ops.sparse_attn.index import random_selection  # noqa: E402


@pytest.mark.parametrize("hkv", [1, 3])
def test_gather_kernel_sums_every_selected_block_once(hkv):
    n, dim, bs, topk = 72, 16, 16, 4
    g = torch.Generator().manual_seed(hkv)
    k = torch.randn(1, n, hkv, dim, generator=g)
    v = torch.randn(1, n, hkv, dim, generator=g)
    idx = random_selection(1, n, hkv, topk, bs, generator=torch.Generator().manual_seed(0))
    assert (idx < 0).any(), "the selection should have -1 slots (early tokens)"
    idx[0, -1, 0] = torch.tensor([0, 4, -1, 2], dtype=idx.dtype)  # block 4 is partial (72 = 4 x 16 + 8)
    got = gather_floor.gather_sums(k, v, idx, bs)
    want = gather_floor.reference_sums(k, v, idx, bs, torch.arange(n))
    # loop form of the same sums: catches a reference that shares the kernel's mistake
    loop = torch.zeros(n, hkv)
    for t in range(n):
        for h in range(hkv):
            for b in idx[0, t, h].tolist():
                if b >= 0:
                    loop[t, h] += (k[0, b * bs:(b + 1) * bs, h] + v[0, b * bs:(b + 1) * bs, h]).sum()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(want, loop, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got, loop, rtol=1e-5, atol=1e-4)
    valid = int(((idx >= 0) & (idx.long() * bs < n)).sum())
    assert gather_floor.gathered_bytes(idx, n, bs, dim, 4) == valid * bs * dim * 2 * 4
