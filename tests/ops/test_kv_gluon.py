"""The Gluon KV-outer MAIN for Hopper (sparsa/ops/sparse_attn/kv_gluon.py; default for G >= 2, SPARSA_KV_GLUON=0/1).

Without a GPU: which calls it covers, that the switch leaves CPU calls on the Triton MAIN, and its sm_90 build
(compiled with Triton's bundled ptxas: no spills, two programs per SM, TMA and cp.async loads). On a Hopper GPU:
its output and LSE against the Triton MAIN's and the float64 reference.
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
from sparsa.ops.sparse_attn import kv_gluon, naive
from sparsa.ops.sparse_attn.index import random_selection
from tests.helpers import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IS_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_gluon = pytest.mark.skipif(not kv_gluon.HAVE_GLUON, reason="this Triton has no Gluon")


def _qkv(n, hkv, group, d, dtype=torch.bfloat16, dv=None, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, hkv * group, d, generator=g)
    k = torch.randn(n, hkv, d, generator=g)
    v = torch.randn(n, hkv, dv or d, generator=g)
    return [x.to(device, dtype) for x in (q, k, v)]


def test_covers_only_its_scope():
    q, k, v = _qkv(128, 2, 4, 128)
    assert kv_gluon.covers(q, k, v, 64, local=False)
    assert not kv_gluon.covers(q, k, v, 32, local=False)  # block size
    assert not kv_gluon.covers(q, k, v, 64, local=True)  # fused local blocks
    assert not kv_gluon.covers(*_qkv(128, 2, 4, 256), 64, local=False)  # head dim
    assert not kv_gluon.covers(*_qkv(128, 2, 4, 128, dv=64), 64, local=False)  # Dv != D
    assert not kv_gluon.covers(*_qkv(128, 2, 4, 128, dtype=torch.float32), 64, local=False)
    assert not kv_gluon.covers(*_qkv(128, 1, 128, 64), 64, local=False)  # G > 64 rows
    assert kv_gluon.covers(*_qkv(128, 2, 3, 64, dtype=torch.float16), 64, local=False)
    assert not kv_gluon.covers(q[:, :, 1:65], k[:, :, :64], v[:, :, :64], 64, local=False)  # strided views
    flat = torch.zeros(128 * 8 * 64 + 1, dtype=torch.bfloat16)
    assert not kv_gluon.covers(flat[1:].view(128, 8, 64), *_qkv(128, 2, 4, 64)[1:], 64, local=False)  # 2-byte offset
    assert not kv_gluon.eligible(q, k, v, 64, local=False)  # CPU tensors


def test_pipeline_from_group_two():
    """The PIPELINE loop runs from G = 2; G = 1 (forced on) runs the loop without it, measured faster there."""
    assert kv_gluon.PIPELINE and kv_gluon.PIPELINE_MIN_GROUP == 2
    assert not kv_gluon.uses_pipeline(1) and kv_gluon.uses_pipeline(2) and kv_gluon.uses_pipeline(16)


def test_switch_comes_from_the_environment(monkeypatch):
    """Unset: on from G = DEFAULT_MIN_GROUP (2), and at G = 1 below G1_MAX_TOKENS (32K); 1 / 0 force it on / off."""
    monkeypatch.delenv("SPARSA_KV_GLUON", raising=False)
    assert kv_gluon.DEFAULT_MIN_GROUP == 2 and kv_gluon.G1_MAX_TOKENS == 32768
    assert not kv_gluon.enabled(1, 32768) and not kv_gluon.enabled(1, 65536)
    assert kv_gluon.enabled(1, 16384) == kv_gluon.enabled(2, 65536) == kv_gluon.HAVE_GLUON
    assert kv_gluon.enabled(2) == kv_gluon.enabled(8) == kv_gluon.HAVE_GLUON
    monkeypatch.setenv("SPARSA_KV_GLUON", "1")
    assert kv_gluon.enabled(1) == kv_gluon.HAVE_GLUON
    monkeypatch.setenv("SPARSA_KV_GLUON", "0")
    assert not kv_gluon.enabled(4)
    monkeypatch.setenv("SPARSA_KV_GLUON", "maybe")
    with pytest.raises(ValueError, match="SPARSA_KV_GLUON"):
        kv_gluon.enabled(4)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU path runs in the interpreter")
def test_dispatch_stays_on_triton_past_the_int32_partial_rows(monkeypatch):
    """The forward hands MAIN to this kernel only while a slice's partial rows fit its int32 TMA coordinates and
    the partials are in the input dtype (launch_main stubbed: the CPU cannot run it)."""
    monkeypatch.setenv("SPARSA_BACKEND", "triton")
    monkeypatch.setattr(kv_gluon, "eligible", lambda *a: True)
    monkeypatch.setattr(kv_gluon, "enabled", lambda group, n_tokens=0: True)

    class Reached(Exception):
        pass

    def launch(*a):
        raise Reached

    monkeypatch.setattr(kv_gluon, "launch_main", launch)
    q, k, v = (x.unsqueeze(0) for x in _qkv(96, 2, 4, 16, dtype=torch.float32))
    idx = random_selection(1, 96, 2, 3, 16, generator=torch.Generator().manual_seed(2))
    with pytest.raises(Reached):
        sparsa.sparse_attention(q, k, v, idx, block_size=16, loop_order="kv_outer")
    monkeypatch.setattr(kv_gluon, "MAX_PARTIAL_ROWS", 2 * 96 * 3 * 4)  # the slice's rows: not below the bound
    sparsa.sparse_attention(q, k, v, idx, block_size=16, loop_order="kv_outer")  # the Triton MAIN
    # fp16 inputs with fp32 partials (kv_outer.PARTIAL_DTYPE): its partial tiles are in the input dtype, so Triton
    from sparsa.ops.sparse_attn import kv_outer as kv_mod

    monkeypatch.setattr(kv_gluon, "MAX_PARTIAL_ROWS", 2**31)
    monkeypatch.setattr(kv_mod, "PARTIAL_DTYPE", torch.float32)
    half = [x.half() for x in (q, k, v)]
    sparsa.sparse_attention(*half, idx, block_size=16, loop_order="kv_outer")
    monkeypatch.setattr(kv_mod, "PARTIAL_DTYPE", None)
    with pytest.raises(Reached):
        sparsa.sparse_attention(*half, idx, block_size=16, loop_order="kv_outer")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU path runs in the interpreter")
def test_switch_on_cpu_keeps_the_triton_main(monkeypatch):
    """CPU tensors are never eligible: with the switch on, the KV-outer forward is the Triton MAIN's, bit for bit."""
    monkeypatch.setenv("SPARSA_BACKEND", "triton")
    q, k, v = (x.unsqueeze(0) for x in _qkv(96, 2, 4, 16, dtype=torch.float32))
    idx = random_selection(1, 96, 2, 3, 16, generator=torch.Generator().manual_seed(1))
    outs = []
    for flag in ("0", "1"):
        monkeypatch.setenv("SPARSA_KV_GLUON", flag)
        outs.append(sparsa.sparse_attention(q, k, v, idx, block_size=16, loop_order="kv_outer", return_lse=True))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@needs_gluon
def test_sm90_build_has_no_spills_and_two_programs_per_sm():
    """scripts/kv_gluon_build.py in a subprocess (Gluon does not compile under the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "kv_gluon_build.py"), "--groups", "1,3,16",
                          "--dims", "64,128"], env=env, capture_output=True, text=True, check=True, timeout=600).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == 6
    for r in rows:
        assert r["spill_bytes"] == 0, r
        assert r["shared"] * kv_gluon.PROGRAMS_PER_SM <= 227 << 10, r  # the programs per SM fit
        assert r["registers"] * 128 * kv_gluon.PROGRAMS_PER_SM <= 65536, r
        assert r["utmaldg"] >= 2 and r["ldgsts"] >= 1, r  # K and V by TMA, the query rows by cp.async
        # Q K^T over D, P V over the 64 keys; the PIPELINE kernel has both in its prologue (item 0) and in its loop
        assert r["hgmma"] == (2 if kv_gluon.uses_pipeline(r["G"]) else 1) * (r["D"] + 64) // 16, r


@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("group, d", [(1, 128), (4, 128), (5, 64), (16, 128)])
@pytest.mark.parametrize(
    "flags", [(), ("TMA_STORE", "OFFSETS_I32"), ("TMA_STORE", "OFFSETS_I32", "PIPELINE"), ("PIPELINE",)],
    ids=["base", "tma_i32", "tma_i32_pipe", "pipe"],
)
def test_gpu_gluon_main_matches_triton_main(monkeypatch, group, d, flags):
    """bf16 at 2048 tokens, outputs poisoned: the forward with the Gluon MAIN (without and with the session-15
    variants TMA_STORE, OFFSETS_I32, PIPELINE) against the Triton MAIN's (the same arithmetic per row) and against the float64
    reference (within the bf16 tolerance of the other GPU tests)."""
    for name in ("TMA_STORE", "OFFSETS_I32", "PIPELINE"):
        monkeypatch.setattr(kv_gluon, name, name in flags)
    monkeypatch.setattr(kv_gluon, "PIPELINE_MIN_GROUP", 1)  # the PIPELINE loop at G = 1 too
    monkeypatch.setenv("SPARSA_KV_GLUON_WS", "0")  # these kernels, not the warp-specialised one (test_kv_gluon_ws.py)
    monkeypatch.setenv("SPARSA_BACKEND", "triton")
    monkeypatch.setattr(alloc_mod, "POISON_OUTPUTS", True)
    hkv = max(1, 32 // group)
    q, k, v = (x.unsqueeze(0) for x in _qkv(2048, hkv, group, d, device="cuda", seed=group))
    idx = random_selection(1, 2048, hkv, 16, 64, generator=torch.Generator().manual_seed(group), device="cuda")
    got = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("SPARSA_KV_GLUON", flag)
        got[flag] = sparsa.sparse_attention(q, k, v, idx, block_size=64, loop_order="kv_outer", return_lse=True)
    (o0, l0), (o1, l1) = got["0"], got["1"]
    assert torch.isfinite(o1).all() and torch.isfinite(l1).all()
    assert rel_err(o1.float(), o0.float()) < 1e-6 and rel_err(l1, l0) < 1e-6
    ref, _ = naive.sparse_attention(q.double(), k.double(), v.double(), idx, block_size=64, scale=d**-0.5)
    assert rel_err(o1.double(), ref) < 2e-2
