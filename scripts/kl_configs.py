"""Times the StreamKL forward kernel at fixed tile configs against SDPA, in one process (GPU).

    python3 scripts/kl_configs.py [--sizes 2048,8192,32768] [--configs 128,64,8,3 128,32,4,2 ...]

Shape as benchmarks/attention_kl.py (batch 1, H = 32, D = 128, causal, bf16, same scale). Each config
(BM, BN, warps, stages) is forced by replacing the autotuner's choice for the forward; the loss of each
config is checked against the autotuned kernel's. Prints one line per (N, config): ms (do_bench median)
and the ratio to SDPA's causal forward of the same shape.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sparsa  # noqa: E402
from sparsa.ops.kl import triton_ops  # noqa: E402

DEFAULT_CONFIGS = ["128,64,8,3", "128,64,8,2", "128,128,8,2", "128,32,4,2", "128,32,4,3", "128,32,8,2",
                   "256,64,8,2", "256,32,8,2", "64,64,4,2"]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


@contextlib.contextmanager
def forced(meta):
    """The forward kernel launches with `meta` (a dict of BM, BN, num_warps, num_stages) inside the block."""
    original = triton_ops._kernel

    def kernel(name, fn, configs):
        return (fn, dict(meta)) if name == "fwd" else original(name, fn, configs)

    triton_ops._kernel = kernel
    triton_ops._LAUNCHERS.pop("fwd", None)
    try:
        yield
    finally:
        triton_ops._kernel = original
        triton_ops._LAUNCHERS.pop("fwd", None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2048,8192,32768")
    ap.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS)
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    h, d = 32, 128
    for n in (int(s) for s in args.sizes.split(",")):
        torch.manual_seed(0)
        q_t, k_t, q_s, k_s = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        qh, kh = q_t.transpose(1, 2).contiguous(), k_t.transpose(1, 2).contiguous()
        with torch.no_grad():
            sdpa = bench(lambda: F.scaled_dot_product_attention(qh, kh, kh, is_causal=True))
            ref = sparsa.attention_kl(q_t, k_t, q_s, k_s)
            auto = bench(lambda: sparsa.attention_kl(q_t, k_t, q_s, k_s))
        print(f"N={n:6d} sdpa {sdpa:8.3f} ms | autotuned {auto:8.3f} ms {auto / sdpa:5.3f}x", flush=True)
        for cfg in args.configs:
            bm, bn, w, s = (int(x) for x in cfg.split(","))
            meta = {"BM": bm, "BN": bn, "num_warps": w, "num_stages": s}
            try:
                with forced(meta), torch.no_grad():
                    out = sparsa.attention_kl(q_t, k_t, q_s, k_s)
                    err = abs(out.item() - ref.item()) / abs(ref.item())
                    ms = bench(lambda: sparsa.attention_kl(q_t, k_t, q_s, k_s))
                print(f"N={n:6d} {cfg:>12s} {ms:8.3f} ms {ms / sdpa:5.3f}x  loss rel diff {err:.1e}", flush=True)
            except Exception as e:  # out of resources etc.
                print(f"N={n:6d} {cfg:>12s} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)

        torch.cuda.empty_cache()
    print("done")


if __name__ == "__main__":
    main()
