"""The warp-specialised KV-outer MAIN (sparsa/ops/sparse_attn/kv_gluon_ws.py; default for G >= 2, SPARSA_KV_GLUON_WS).

Without a GPU: the switch, and its sm_90 build (Triton's bundled ptxas: no spills, the stages within an SM's shared
memory, the partitions' registers within the register file, one Q K^T and one P V per compute warpgroup, TMA and
cp.async loads). On a Hopper GPU: its output and LSE against the default Gluon MAIN's (the same arithmetic per row:
equal) and against the float64 reference, outputs poisoned.
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
from sparsa.ops.sparse_attn import kv_gluon, kv_gluon_ws, naive
from sparsa.ops.sparse_attn.index import random_selection
from tests.helpers import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IS_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def test_switch_comes_from_the_environment(monkeypatch):
    """Unset: on from G = 2 (measured faster there), off at G = 1 (not measured); 1 / 0 force it on / off."""
    monkeypatch.delenv("SPARSA_KV_GLUON_WS", raising=False)
    assert kv_gluon_ws.DEFAULT_MIN_GROUP == 2
    assert not kv_gluon_ws.enabled(1)
    assert kv_gluon_ws.enabled(2) == kv_gluon_ws.enabled(16) == kv_gluon.HAVE_GLUON
    monkeypatch.setenv("SPARSA_KV_GLUON_WS", "1")
    assert kv_gluon_ws.enabled(1) == kv_gluon.HAVE_GLUON
    monkeypatch.setenv("SPARSA_KV_GLUON_WS", "0")
    assert not kv_gluon_ws.enabled(8)
    monkeypatch.setenv("SPARSA_KV_GLUON_WS", "yes please")
    with pytest.raises(ValueError, match="SPARSA_KV_GLUON_WS"):
        kv_gluon_ws.enabled(4)


@pytest.mark.skipif(not kv_gluon.HAVE_GLUON, reason="this Triton has no Gluon")
def test_sm90_build_fits_one_program_per_sm():
    """scripts/kv_gluon_build.py --kernel ws in a subprocess (Gluon does not compile under the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "kv_gluon_build.py"), "--kernel", "ws",
                          "--groups", "1,5", "--dims", "64,128"], env=env, capture_output=True, text=True, check=True,
                         timeout=600).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == 4
    for r in rows:
        assert r["spill_bytes"] == 0, r
        assert r["shared"] <= 227 << 10, r
        assert r["shared"] >= kv_gluon_ws.STAGES * 3 * 64 * r["D"] * 2, r  # the ring: Q rows, K and V per stage
        # the loader's 4 warps give up registers (setmaxnreg.dec) and each compute warpgroup takes COMPUTE_REGS
        regs = r["setmaxnreg"]
        assert regs.count(kv_gluon_ws.COMPUTE_REGS) == kv_gluon_ws.NWG, r
        loader = min(regs)
        assert 128 * loader + kv_gluon_ws.NWG * 128 * kv_gluon_ws.COMPUTE_REGS <= 65536, r
        assert r["utmaldg"] >= 2 and r["ldgsts"] >= 1 and r["tma_stores"] >= 1, r
        assert r["hgmma"] == kv_gluon_ws.NWG * (r["D"] + 64) // 16, r  # Q K^T over D, P V over 64 keys, per warpgroup


@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("group, d, n", [(1, 128, 2048), (4, 128, 2048), (5, 64, 2000), (16, 128, 2048), (4, 128, 192)])
def test_gpu_ws_main_matches_gluon_main(monkeypatch, group, d, n):
    """bf16, outputs poisoned: the forward with SPARSA_KV_GLUON_WS=1 against the default Gluon MAIN (same per-row
    arithmetic: equal) and the float64 reference. n = 2000 ends in a short block; n = 192 leaves most compute
    warpgroups without an item."""
    monkeypatch.setenv("SPARSA_BACKEND", "triton")
    monkeypatch.setenv("SPARSA_KV_GLUON", "1")
    monkeypatch.setattr(alloc_mod, "POISON_OUTPUTS", True)
    hkv = max(1, 32 // group)
    gen = torch.Generator().manual_seed(group + n)
    q = torch.randn(1, n, hkv * group, d, generator=gen).to("cuda", torch.bfloat16)
    k = torch.randn(1, n, hkv, d, generator=gen).to("cuda", torch.bfloat16)
    v = torch.randn(1, n, hkv, d, generator=gen).to("cuda", torch.bfloat16)
    idx = random_selection(1, n, hkv, 16, 64, generator=torch.Generator().manual_seed(group), device="cuda")
    got = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("SPARSA_KV_GLUON_WS", flag)
        got[flag] = sparsa.sparse_attention(q, k, v, idx, block_size=64, loop_order="kv_outer", return_lse=True)
        torch.cuda.synchronize()
    (o0, l0), (o1, l1) = got["0"], got["1"]
    assert torch.isfinite(o1).all() and torch.isfinite(l1).all()
    assert rel_err(o1.float(), o0.float()) < 1e-6 and rel_err(l1, l0) < 1e-6
    ref, _ = naive.sparse_attention(q.double(), k.double(), v.double(), idx, block_size=64, scale=d**-0.5)
    assert rel_err(o1.double(), ref) < 2e-2


def test_schedule_comes_from_the_environment(monkeypatch):
    """SPARSA_KV_WS_CONFIG (A/B runs): "3xS" / "3xSo"; unset, the module's STAGES, OUT_BUF; bad values rejected."""
    monkeypatch.delenv("SPARSA_KV_WS_CONFIG", raising=False)
    assert kv_gluon_ws.schedule() == (kv_gluon_ws.STAGES, kv_gluon_ws.OUT_BUF)
    monkeypatch.setenv("SPARSA_KV_WS_CONFIG", "3x3o")
    assert kv_gluon_ws.schedule() == (3, True)
    monkeypatch.setenv("SPARSA_KV_WS_CONFIG", "3x5")
    assert kv_gluon_ws.schedule() == (5, False)
    for bad in ("2x4", "4x4", "3x", "3x9", "3x4p", "x4", "3x4oo", "3x4d"):
        monkeypatch.setenv("SPARSA_KV_WS_CONFIG", bad)
        with pytest.raises(ValueError, match="SPARSA_KV_WS_CONFIG"):
            kv_gluon_ws.schedule()
    monkeypatch.setenv("SPARSA_KV_WS_PROBE", "8")
    with pytest.raises(ValueError, match="SPARSA_KV_WS_PROBE"):
        kv_gluon_ws.probe_bits()


@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("config", ["3x3o", "3x3"])
@pytest.mark.parametrize("group, d, n", [(4, 128, 2048), (5, 64, 2000), (16, 128, 192)])
def test_gpu_ws_schedules_match_gluon_main(monkeypatch, config, group, d, n):
    """The other schedules (3 stages; a partial buffer per warpgroup): equal to the default Gluon MAIN, bf16, outputs
    poisoned."""
    monkeypatch.setenv("SPARSA_BACKEND", "triton")
    monkeypatch.setenv("SPARSA_KV_GLUON", "1")
    monkeypatch.setattr(alloc_mod, "POISON_OUTPUTS", True)
    hkv = max(1, 32 // group)
    gen = torch.Generator().manual_seed(7 * group + n)
    q = torch.randn(1, n, hkv * group, d, generator=gen).to("cuda", torch.bfloat16)
    k = torch.randn(1, n, hkv, d, generator=gen).to("cuda", torch.bfloat16)
    v = torch.randn(1, n, hkv, d, generator=gen).to("cuda", torch.bfloat16)
    idx = random_selection(1, n, hkv, 16, 64, generator=torch.Generator().manual_seed(group), device="cuda")
    monkeypatch.setenv("SPARSA_KV_GLUON_WS", "0")
    o0, l0 = sparsa.sparse_attention(q, k, v, idx, block_size=64, loop_order="kv_outer", return_lse=True)
    monkeypatch.setenv("SPARSA_KV_GLUON_WS", "1")
    monkeypatch.setenv("SPARSA_KV_WS_CONFIG", config)
    o1, l1 = sparsa.sparse_attention(q, k, v, idx, block_size=64, loop_order="kv_outer", return_lse=True)
    torch.cuda.synchronize()
    assert torch.isfinite(o1).all() and torch.isfinite(l1).all()
    assert rel_err(o1.float(), o0.float()) < 1e-6 and rel_err(l1, l0) < 1e-6
