"""GPU check of the Gluon StreamKL forward (sparsa/ops/kl/gluon_fwd.py): outputs against the Triton kernel
and the float64 reference, then forward times of Gluon configs against the Triton kernel and SDPA.

    SPARSA_POISON_OUTPUTS=1 python3 scripts/kl_gluon_check.py [--sizes 2048,8192,32768] [--configs 64,64,4,2,0,0 ...]

Correctness cases: GQA groupings that differ between the sides, batch 2, ragged lengths, N_q != N_k (both
ways, bottom-right causal), non-causal, head dim 64 in fp16, different scales, logits up to |q.k| ~ 50,
identical sides (KL ~ 0). Outputs are NaN-poisoned when SPARSA_POISON_OUTPUTS=1 (an unwritten element
fails the check). Timing: batch 1, H = 32, D = 128, causal, bf16, do_bench medians.

Each config runs in its own subprocess (`--one`) with a timeout (`--config-timeout`), so that a hang or a
crash of one variant is reported and the others still run; SDPA and the Triton kernel are timed once, in
the parent, and the ratios are computed there.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparsa.ops.kl import gluon_fwd, naive, triton_ops  # noqa: E402

CASES = [
    # batch, n_q, n_k, heads, kv heads p, kv heads q, d, dtype, causal, logit multiplier, same inputs, scale_q factor
    (1, 2048, 2048, 4, 4, 4, 128, torch.bfloat16, True, 1.0, False, 1.0),
    (2, 1000, 1000, 4, 2, 1, 128, torch.bfloat16, True, 1.0, False, 1.0),
    (1, 777, 1500, 4, 4, 2, 64, torch.float16, True, 1.0, False, 1.0),
    (1, 1500, 777, 2, 2, 2, 128, torch.bfloat16, True, 1.0, False, 1.0),
    (1, 1100, 1100, 2, 1, 2, 128, torch.bfloat16, False, 1.0, False, 1.0),
    (1, 1024, 1024, 2, 2, 2, 128, torch.bfloat16, True, 50.0, False, 1.0),
    (1, 1024, 1024, 2, 2, 2, 128, torch.float16, True, 50.0, False, 0.5),
    (1, 1024, 1024, 2, 2, 2, 128, torch.bfloat16, True, 1.0, True, 1.0),
]


def rel(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def both(qp, kp, qq, kq, causal, sp, sq, config=None):
    """(Gluon outputs, Triton-kernel outputs) of the forward."""
    g = gluon_fwd.kl_forward_gluon(qp, kp, qq, kq, causal=causal, scale_p=sp, scale_q=sq, config=config)
    return g, triton_ops.kl_forward(qp, kp, qq, kq, causal=causal, scale_p=sp, scale_q=sq)


def check(config) -> bool:
    ok = True
    for case in CASES:
        bsz, n_q, n_k, h, hp, hq, d, dtype, causal, mult, same, sq_factor = case
        gen = torch.Generator(device="cuda").manual_seed(hash(case) % (1 << 31))
        mk = lambda n, hh: torch.randn(bsz, n, hh, d, device="cuda", generator=gen).to(dtype)  # noqa: E731
        qp, kp = mk(n_q, h) * mult ** 0.5, mk(n_k, hp) * mult ** 0.5
        if same:
            qq, kq = qp.clone(), kp.clone()
        else:
            qq, kq = mk(n_q, h), mk(n_k, hq)
        sp = d ** -0.5
        sq = sp * sq_factor
        assert gluon_fwd.eligible(qp, kp, qq, kq, None, False), case
        (gk, gp, gq), (tk, tp, tq) = both(qp, kp, qq, kq, causal, sp, sq, config)
        finite = bool(torch.isfinite(gk).all() and torch.isfinite(gp).all() and torch.isfinite(gq).all())
        errs = [rel(gk, tk), rel(gp, tp), rel(gq, tq)]
        line = f"case {case[:7]} {str(dtype)[6:]} causal={causal} x{mult} same={same}: finite={finite} " \
               f"rel err vs triton kl {errs[0]:.1e} lse_p {errs[1]:.1e} lse_q {errs[2]:.1e}"
        if same:
            line += f" max |kl| {gk.abs().max().item():.1e}"
            good = finite and gk.abs().max().item() < 1e-4
        else:
            good = finite and max(errs) < 1e-4
        if n_q * n_k <= 2048 * 2048 and bsz * h <= 8:
            ref = naive.attention_kl(qp.double(), kp.double(), qq.double(), kq.double(), causal=causal,
                                     scale_t=sp, scale_s=sq)[0]  # [B, Tq, H]
            err = (gk.double() - ref).abs().max().item()
            line += f" | max abs err vs fp64 reference {err:.1e}"
            good = good and err < 2e-3
        ok &= good
        print(("ok   " if good else "FAIL ") + line, flush=True)
    return ok


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def host_ms(call, reps=20):
    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        call()
    ms = (time.perf_counter() - start) * 1e3 / reps
    torch.cuda.synchronize()
    return ms


def _inputs(n, h=32, d=128):
    torch.manual_seed(0)
    return [torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4)]


def _baseline(n, report_host):
    """(SDPA causal forward ms, Triton-kernel KL forward ms) at N = n."""
    d = 128
    qp, kp, qq, kq = _inputs(n)
    qh, kh = qp.transpose(1, 2).contiguous(), kp.transpose(1, 2).contiguous()
    sdpa = bench(lambda: F.scaled_dot_product_attention(qh, kh, kh, is_causal=True))
    tri = bench(lambda: triton_ops.kl_forward(qp, kp, qq, kq, causal=True, scale_p=d ** -0.5, scale_q=d ** -0.5))
    print(f"N={n:6d} sdpa {sdpa:8.3f} | triton {tri:8.3f} ({tri / sdpa:.3f}x)", flush=True)
    if report_host:
        call = lambda: gluon_fwd.kl_forward_gluon(qp, kp, qq, kq, causal=True, scale_p=0.1, scale_q=0.1)  # noqa: E731
        print(f"host time per Gluon call (enqueue, 20 calls): {host_ms(call):.3f} ms", flush=True)
    return sdpa, tri


def _gluon_ms(n, cfg):
    qp, kp, qq, kq = _inputs(n)
    return bench(lambda: gluon_fwd.kl_forward_gluon(qp, kp, qq, kq, causal=True, scale_p=128 ** -0.5,
                                                    scale_q=128 ** -0.5, config=cfg))


def baselines(sizes):
    """{N: (SDPA ms, Triton-kernel ms)}; the first size also reports the host time of a Gluon call."""
    out = {}
    for n in sizes:
        out[n] = _baseline(n, n == sizes[0])
        torch.cuda.empty_cache()
    return out


def run_one(cfg, sizes, with_check) -> bool:
    """Correctness and forward times of one config; prints `RESULT <N> <ms>` lines for the parent."""
    ok = True
    if with_check:
        print(f"correctness, config {cfg}", flush=True)
        ok = check(cfg)
    for n in sizes:
        print(f"RESULT {n} {_gluon_ms(n, cfg)}", flush=True)
        torch.cuda.empty_cache()
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2048,8192,32768")
    ap.add_argument("--configs", nargs="*", default=["64,64,4,2,0,0", "64,64,4,2,1,0", "64,64,4,2,0,1",
                                                     "64,64,4,2,0,2", "ws,64,4,0", "ws,64,4,1", "ws,64,3,0"],
                    help="BM,BN,WARPS,STAGES[,PAIRED[,QREG]] or ws[,BN[,STAGES[,QREG]]] (gluon_fwd._parse_config)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--one", help="internal: run one config in this process")
    ap.add_argument("--config-timeout", type=float, default=150.0, help="seconds per config (a hang is reported)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    os.environ["SPARSA_KL_GLUON"] = "1"
    if args.one:
        sys.exit(0 if run_one(gluon_fwd._parse_config(args.one), sizes, not args.no_check) else 1)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", flush=True)
    base = baselines(sizes)
    ok = True
    for text in args.configs:
        cfg = gluon_fwd._parse_config(text)  # a bad config fails here, before any launch
        cmd = [sys.executable, os.path.abspath(__file__), "--one", text, "--sizes", args.sizes]
        cmd += ["--no-check"] if args.no_check else []
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.config_timeout)
            out, status = proc.stdout, (None if proc.returncode == 0 else f"exit {proc.returncode}: "
                                        + " | ".join(proc.stderr.strip().splitlines()[-3:]))
        except subprocess.TimeoutExpired as exc:
            partial = exc.stdout or ""
            out = partial.decode() if isinstance(partial, bytes) else partial
            status = f"timed out after {args.config_timeout:.0f} s (a hang?)"
        for line in out.splitlines():
            if line.startswith("RESULT "):
                n, ms = int(line.split()[1]), float(line.split()[2])
                sdpa, tri = base[n]
                print(f"N={n:6d} gluon {cfg} {ms:8.3f} ms  {ms / sdpa:.3f}x sdpa  {ms / tri:.3f}x triton", flush=True)
            elif line.strip():
                print(line, flush=True)
        if status:
            ok = False
            print(f"config {cfg}: {status}", flush=True)
    print("checks passed" if ok else "CHECKS FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
