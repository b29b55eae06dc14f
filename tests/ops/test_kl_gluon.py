"""The Gluon StreamKL forward for Hopper (sparsa/ops/kl/gluon_fwd.py).

Without a GPU: when it is used, and its sm_90 build (compiled here with Triton's bundled ptxas): no
spills, and the schedule the kernel exists for (a key tile's wgmmas are issued before the previous
tile's exponentials and waited for after them). On a Hopper GPU: outputs against the Triton kernel.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from sparsa.ops.kl import gluon_fwd, triton_ops

needs_gluon = pytest.mark.skipif(not gluon_fwd.HAVE_GLUON, reason="this Triton has no Gluon")
IS_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _inputs(n, heads=2, d=128, dtype=torch.bfloat16, device="cpu"):
    g = torch.Generator(device=device).manual_seed(n)
    return [torch.randn(1, n, heads, d, device=device, generator=g).to(dtype) for _ in range(4)]


def test_gluon_forward_only_on_hopper_inputs(monkeypatch):
    monkeypatch.setenv("SPARSA_KL_GLUON", "1")
    qp, kp, qq, kq = _inputs(64)
    assert not gluon_fwd.eligible(qp, kp, qq, kq, None, False)  # CPU tensors
    monkeypatch.setenv("SPARSA_KL_GLUON", "0")
    assert not gluon_fwd.enabled()
    assert gluon_fwd.mode() == "off"
    # row views: [B, N, H, D] with unit D stride and rows of H * D; a transposed layout is not one
    assert gluon_fwd._row_view(qp) is not None
    assert gluon_fwd._row_view(qp.transpose(1, 2).contiguous().transpose(1, 2)) is None


def _overlapped_regions(sass: str) -> list[int]:
    """Exponentials issued between an HGMMA and the next wgmma wait, for each such window."""
    counts, inside, n = [], False, 0
    for line in sass.splitlines():
        if re.search(r"\bHGMMA\.", line):
            inside, n = True, 0
        elif "WARPGROUP.DEPBAR" in line and inside:
            counts.append(n)
            inside = False
        elif inside and "MUFU.EX2" in line:
            n += 1
    return counts


def _offline_build(config, tmp_path):
    """(SASS, ptxas report) of the sm_90 build, compiled in a subprocess: Gluon does not compile under the
    Triton interpreter that the CPU tests run in (tests/conftest.py)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SASS_OUT"] = str(tmp_path / "kernel.sass")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    script = os.path.join(ROOT, "scripts", "kl_gluon_sass.py")
    report = subprocess.run([sys.executable, script, *map(str, config)], env=env, capture_output=True, text=True,
                            check=True, timeout=300).stdout
    return (tmp_path / "kernel.sass").read_text(), report


@needs_gluon
@pytest.mark.parametrize(
    "config, max_shared",
    [
        ((64, 64, 4, 2, 0, 0), 113 << 10),  # two CTAs per SM
        ((64, 64, 4, 2, 1, 0), 113 << 10),
        ((64, 64, 4, 2, 0, 2), 113 << 10),
        (("ws", 64, 4, 0), 227 << 10),  # one CTA per SM
        (gluon_fwd.DEFAULT_CONFIG, 227 << 10),
    ],
)
def test_gluon_forward_sm90_build_overlaps_gemms_and_exponentials(config, max_shared, tmp_path):
    sass, report = _offline_build(config, tmp_path)
    assert "0 bytes spill stores" in report, report
    shared = int(re.search(r"shared (\d+) B", report).group(1))
    assert shared <= max_shared
    regions = _overlapped_regions(sass)
    bm, bn, warps = (64, 64, 4) if config[0] == "ws" else config[:3]  # per compute warpgroup for "ws"
    exps_per_tile = 2 * bm * bn // (32 * warps)  # both sides, per thread
    # the steady-state loop: some window holds a whole tile's exponentials while the next GEMMs run
    assert regions and max(regions) >= exps_per_tile, regions
    if config[0] == "ws":  # both compute warpgroups
        assert sum(r >= exps_per_tile for r in regions) >= 2, regions


@needs_gluon
def test_gluon_dispatch_mode_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("SPARSA_KL_GLUON", raising=False)
    assert gluon_fwd.mode() == "auto"
    monkeypatch.setenv("SPARSA_KL_GLUON", "1")
    assert gluon_fwd.mode() == "on"
    monkeypatch.setenv("SPARSA_KL_GLUON", "yes")
    with pytest.raises(ValueError, match="SPARSA_KL_GLUON"):
        gluon_fwd.mode()


def test_gluon_config_is_checked():
    assert gluon_fwd._parse_config("64,64,4,2") == (64, 64, 4, 2, 1, 0)
    assert gluon_fwd._parse_config("64,64,4,2,0,2") == (64, 64, 4, 2, 0, 2)
    assert gluon_fwd._parse_config("ws") == ("ws", 64, 4, 0)
    assert gluon_fwd._parse_config("ws,64,3") == ("ws", 64, 3, 0)
    with pytest.raises(ValueError, match="SPARSA_KL_GLUON_CONFIG"):
        gluon_fwd._parse_config("ws,64,3,0,1")
    with pytest.raises(ValueError, match="SPARSA_KL_GLUON_CONFIG"):
        gluon_fwd._parse_config("64,64")


@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("n, causal, dtype", [(1000, True, torch.bfloat16), (2048, False, torch.float16)])
def test_gpu_gluon_forward_matches_triton_kernel(monkeypatch, n, causal, dtype):
    """The default config only: the other variants run in scripts/kl_gluon_check.py, one subprocess each
    with a timeout, since a variant that has never run on a GPU could hang."""
    config = gluon_fwd.DEFAULT_CONFIG
    qp, kp, qq, kq = _inputs(n, heads=4, dtype=dtype, device="cuda")
    monkeypatch.setenv("SPARSA_KL_GLUON", "1")
    assert gluon_fwd.eligible(qp, kp, qq, kq, None, False)
    got = gluon_fwd.kl_forward_gluon(qp, kp, qq, kq, causal=causal, scale_p=0.088, scale_q=0.07, config=config)
    want = triton_ops.kl_forward(qp, kp, qq, kq, causal=causal, scale_p=0.088, scale_q=0.07)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert ((g - w).norm() / w.norm()).item() < 1e-5


@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU")
def test_gpu_automatic_dispatch_uses_gluon_from_the_key_threshold(monkeypatch):
    """Unset SPARSA_KL_GLUON: the Gluon kernel from GLUON_MIN_KEYS keys on, the Triton kernel below; the
    public op gives the same values either way, also on a second (cached) launch."""
    import sparsa

    monkeypatch.delenv("SPARSA_KL_GLUON", raising=False)
    monkeypatch.delenv("SPARSA_KL_GLUON_CONFIG", raising=False)
    for n in (gluon_fwd.GLUON_MIN_KEYS - 64, gluon_fwd.GLUON_MIN_KEYS):
        qp, kp, qq, kq = _inputs(n, heads=4, device="cuda")
        assert gluon_fwd.eligible(qp, kp, qq, kq, None, False) == (n >= gluon_fwd.GLUON_MIN_KEYS)
        auto = [sparsa.attention_kl(qp, kp, qq, kq, reduction="none") for _ in range(2)]
        monkeypatch.setenv("SPARSA_KL_GLUON", "0")
        want = sparsa.attention_kl(qp, kp, qq, kq, reduction="none")
        monkeypatch.delenv("SPARSA_KL_GLUON")
        for got in auto:
            assert torch.isfinite(got).all()
            assert ((got - want).norm() / want.norm()).item() < 1e-5
