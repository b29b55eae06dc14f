"""The Gluon KV-outer dK/dV for Hopper (sparsa/ops/sparse_attn/kv_gluon_bwd.py; SPARSA_KV_GLUON_BWD=0/1).

Without a GPU: which calls it covers, the switch, and its sm_90 build (compiled with Triton's bundled ptxas: two
programs per SM, TMA and cp.async loads, the five MMAs). On a Hopper GPU: dq, dk, dv in bf16 with outputs poisoned,
against the Triton dK/dV's and the float64 reference, on random selections with a short last block, packed
documents, hot blocks cut into split items and every token choosing the same block.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import sparsa
from sparsa.ops import _alloc as alloc_mod
from sparsa.ops.sparse_attn import backward, kv_gluon_bwd, naive
from sparsa.ops.sparse_attn.index import random_selection
from tests.helpers import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IS_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU")


def _qkv(n, hkv, group, d, dtype=torch.bfloat16, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, hkv * group, d, generator=g)
    k = torch.randn(n, hkv, d, generator=g)
    v = torch.randn(n, hkv, d, generator=g)
    do = torch.randn(n, hkv * group, d, generator=g)
    return [x.to(device, dtype) for x in (q, k, v, do)]


def test_covers_only_bf16_in_the_forward_kernels_scope():
    q, k, v, _ = _qkv(128, 2, 4, 128)
    assert kv_gluon_bwd.covers(q, k, v, 64)
    assert not kv_gluon_bwd.covers(*_qkv(128, 2, 4, 128, dtype=torch.float16)[:3], 64)  # fp32 dQ partials
    assert not kv_gluon_bwd.covers(q, k, v, 32)  # block size
    assert not kv_gluon_bwd.covers(*_qkv(128, 2, 4, 256)[:3], 64)  # head dim
    assert not kv_gluon_bwd.eligible(q, k, v, q, 64)  # CPU tensors


def test_switch_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("SPARSA_KV_GLUON_BWD", raising=False)
    assert kv_gluon_bwd.enabled() == (kv_gluon_bwd.DEFAULT_ON and kv_gluon_bwd.HAVE_GLUON)
    monkeypatch.setenv("SPARSA_KV_GLUON_BWD", "1")
    assert kv_gluon_bwd.enabled() == kv_gluon_bwd.HAVE_GLUON
    monkeypatch.setenv("SPARSA_KV_GLUON_BWD", "0")
    assert not kv_gluon_bwd.enabled()
    monkeypatch.setenv("SPARSA_KV_GLUON_BWD", "yes")
    with pytest.raises(ValueError, match="SPARSA_KV_GLUON_BWD"):
        kv_gluon_bwd.enabled()


def test_timing_probe_comes_from_the_environment(monkeypatch):
    """SPARSA_KV_BWD_PROBE (scripts/kv_ws_probe.py --kernel bwd): 0 unless set; only its bits 1 and 4."""
    monkeypatch.delenv("SPARSA_KV_BWD_PROBE", raising=False)
    assert kv_gluon_bwd.probe_bits() == 0
    monkeypatch.setenv("SPARSA_KV_BWD_PROBE", "5")
    assert kv_gluon_bwd.probe_bits() == 5
    for bad in ("2", "8", "x"):
        monkeypatch.setenv("SPARSA_KV_BWD_PROBE", bad)
        with pytest.raises(ValueError, match="SPARSA_KV_BWD_PROBE"):
            kv_gluon_bwd.probe_bits()


def test_item_sizes_are_whole_tiles():
    """Below 32K tokens 64 tiles, or 512 pairs where that is more (G = 16); from 32K on 256 tiles; capped by the
    backward's MAX_PAIRS_PER_ITEM (2048 pairs) in whole tiles."""
    assert [kv_gluon_bwd.pairs_per_tile(g) for g in (1, 3, 4, 8, 16)] == [64, 21, 16, 8, 4]
    assert [kv_gluon_bwd.pairs_per_item(g, 8192) for g in (1, 3, 4, 8, 16)] == [4096, 64 * 21, 1024, 512, 512]
    assert [kv_gluon_bwd.pairs_per_item(g, 32768) for g in (1, 4, 8, 16)] == [256 * 64, 4096, 2048, 1024]
    # with the backward's cap (2048 pairs) rounded down to whole tiles: G = 5 has tiles of 12 pairs
    assert [kv_gluon_bwd.pairs_per_item(g, 65536, 2048) for g in (1, 4, 5, 8, 16)] == [2048, 2048, 2040, 2048, 1024]
    assert kv_gluon_bwd.pairs_per_item(4, 8192, 8) == 16  # one tile at least
    for g in (1, 3, 4, 5, 8, 16, 64):
        for n in (8192, 65536):
            for cap in (None, 2048, 100):
                assert kv_gluon_bwd.pairs_per_item(g, n, cap) % kv_gluon_bwd.pairs_per_tile(g) == 0


@pytest.mark.skipif(not kv_gluon_bwd.HAVE_GLUON, reason="this Triton has no Gluon")
def test_sm90_build_fits_two_programs_per_sm():
    """scripts/kv_gluon_build.py --kernel bwd in a subprocess (Gluon does not compile under the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "kv_gluon_build.py"), "--kernel", "bwd",
                          "--groups", "1,4,16", "--dims", "64,128"], env=env, capture_output=True, text=True,
                         check=True, timeout=600).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == 6
    for r in rows:
        assert r["shared"] * 2 <= 227 << 10 and r["registers"] * 128 * 2 <= 65536, r  # two programs per SM
        assert r["utmaldg"] >= 2 and r["ldgsts"] >= 3, r  # K, V by TMA; query rows, dO rows, lse / delta by cp.async
        assert r["tma_stores"] >= 3, r  # dQ partial tiles, dK, dV
        # S^T and dP^T over D; dV, dK over the tile's 64 rows; dQ over the block's 64 keys
        assert r["hgmma"] == (2 * r["D"] + 3 * 64) // 16, r
        if r["D"] == 64:
            assert r["spill_bytes"] == 0, r
    no_dq = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "kv_gluon_build.py"), "--kernel", "bwd",
                            "--groups", "4", "--dims", "128", "--no-dq"], env=env, capture_output=True, text=True,
                           check=True, timeout=600).stdout
    (r,) = [json.loads(line) for line in no_dq.splitlines() if line.startswith("{")]
    with_dq = next(x for x in rows if x["G"] == 4 and x["D"] == 128)
    assert r["kernel"] == "dkdv_no_dq" and r["hgmma"] == (2 * 128 + 2 * 64) // 16, r  # no dQ MMA
    assert r["tma_stores"] == with_dq["tma_stores"] - 1 and r["spill_bytes"] <= with_dq["spill_bytes"], (r, with_dq)


def _grads(q, k, v, do, idx, **kw):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    fn = kw.pop("fn", sparsa.sparse_attention)
    out = fn(*leaves, idx, block_size=64, **kw)
    (out[0] if isinstance(out, tuple) else out).backward(do)  # the reference returns (o, lse)
    return [x.grad for x in leaves]


def _check(monkeypatch, n, group, d, idx_fn, cu_seqlens=None, seed=0):
    monkeypatch.setenv("SPARSA_BACKEND", "triton")
    monkeypatch.setattr(alloc_mod, "POISON_OUTPUTS", True)
    hkv = max(1, 32 // group)
    q, k, v, do = (x.unsqueeze(0) for x in _qkv(n, hkv, group, d, device="cuda", seed=seed))
    idx = idx_fn(hkv)
    got = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("SPARSA_KV_GLUON_BWD", flag)
        got[flag] = _grads(q, k, v, do, idx, loop_order="kv_outer", cu_seqlens=cu_seqlens)
    ref = _grads(*(x.double() for x in (q, k, v, do)), idx, fn=naive.sparse_attention, scale=d**-0.5,
                 cu_seqlens=cu_seqlens)
    for name, a, b, r in zip(("dq", "dk", "dv"), got["1"], got["0"], ref):
        assert torch.isfinite(a).all(), name
        err, err_triton = rel_err(a.double(), r), rel_err(b.double(), r)
        assert err < 2e-2 and err < 2 * err_triton + 1e-3, (name, err, err_triton)
        assert rel_err(a.float(), b.float()) < 2e-2, name


@needs_hopper
@pytest.mark.parametrize("group, d", [(1, 128), (4, 128), (5, 64), (8, 128), (16, 128), (4, 64)])
def test_gpu_gluon_dkdv_matches_triton_and_reference(monkeypatch, group, d):
    """2000 tokens (a short last block), random top-16 selections."""
    def idx_fn(hkv):
        return random_selection(1, 2000, hkv, 16, 64, generator=torch.Generator().manual_seed(group), device="cuda")

    _check(monkeypatch, 2000, group, d, idx_fn, seed=group)


@needs_hopper
def test_gpu_gluon_dkdv_split_items_and_packed_documents(monkeypatch):
    """Hot blocks cut into items of 64 pairs (fp32 split slots, SPLIT_REDUCE) and three packed documents."""
    monkeypatch.setattr(backward, "MAX_PAIRS_PER_ITEM", 64)
    cu = torch.tensor([0, 700, 1000, 2048], dtype=torch.int32, device="cuda")

    def idx_fn(hkv):
        return random_selection(1, 2048, hkv, 8, 64, cu_seqlens=cu.cpu(), generator=torch.Generator().manual_seed(7),
                                device="cuda")

    _check(monkeypatch, 2048, 4, 128, idx_fn, cu_seqlens=cu, seed=7)


@needs_hopper
def test_gpu_gluon_dkdv_every_token_the_same_block(monkeypatch):
    """Every token selects block 0 only (and -1 padding): one hot group cut into many items."""
    def idx_fn(hkv):
        idx = torch.full((1, 1024, hkv, 16), -1, dtype=torch.int32, device="cuda")
        idx[..., 0] = 0
        return idx

    _check(monkeypatch, 1024, 4, 128, idx_fn, seed=3)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU path runs in the interpreter")
def test_dispatch_stays_on_triton_past_its_bounds(monkeypatch):
    """The backward hands dK/dV to this kernel only while the slice's dQ partial rows fit its int32 TMA coordinates
    and the partials are in the input dtype, with its own item size (launch_dkdv stubbed: the CPU cannot run it)."""
    monkeypatch.setenv("SPARSA_BACKEND", "triton")
    monkeypatch.setattr(kv_gluon_bwd, "eligible", lambda *a: True)
    monkeypatch.setattr(kv_gluon_bwd, "enabled", lambda: True)
    seen = []

    class Reached(Exception):
        pass

    def launch(q, k, v, do, lse, delta, dqp, dk, dv, dkp, dvp, work, index, meta, scale, write_dq=True):
        seen.append((dqp.dtype, int((work[:, 1] - work[:, 0]).max())))
        raise Reached

    monkeypatch.setattr(kv_gluon_bwd, "launch_dkdv", launch)
    q, k, v, do = (x.unsqueeze(0) for x in _qkv(96, 2, 4, 16, dtype=torch.float32))
    idx = random_selection(1, 96, 2, 3, 16, generator=torch.Generator().manual_seed(5))

    def run_backward(dtype):
        leaves = [x.to(dtype).requires_grad_(True) for x in (q, k, v)]
        sparsa.sparse_attention(*leaves, idx, block_size=16, loop_order="kv_outer").backward(do.to(dtype))

    monkeypatch.setattr(kv_gluon_bwd, "MAX_TILES_PER_ITEM", 1)  # items of one tile: 64 // 4 = 16 pairs
    with pytest.raises(Reached):
        run_backward(torch.float32)  # fp32 inputs have fp32 dQ partials: in the input dtype
    assert seen == [(torch.float32, 16)]
    monkeypatch.setattr(kv_gluon_bwd, "MAX_PARTIAL_ROWS", 2 * 96 * 3 * 4)  # the slice's rows: not below the bound
    run_backward(torch.float32)  # the Triton dK/dV
    monkeypatch.setattr(kv_gluon_bwd, "MAX_PARTIAL_ROWS", 2**31)
    run_backward(torch.float16)  # fp16 inputs have fp32 dQ partials: the Triton dK/dV
    assert len(seen) == 1
