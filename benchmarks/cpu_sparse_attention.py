"""Selected-block attention on the CPU: the dense reference against the memory-bounded blockwise path.

    PYTHONPATH=. python3 benchmarks/cpu_sparse_attention.py [--ns 1024,4096,16384] [--out results.json]

Shape: batch 1, 8 query / 2 KV heads, head dim 64, block 64, top-8 random blocks (float32). For each N: the
forward and forward+backward seconds (median of --repeats) of each path and the elements of its largest
intermediate (dense: the [B, Hq, N, N] logits; blockwise: one chunk, blockwise.CHUNK_ELEMENTS); the dense path is
skipped where its logits exceed --dense-limit elements. Also prints the path the public op takes
(`blockwise.prefers_dense`). Results as JSON (written atomically) with the machine, versions and date.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from sparsa.checkpoint import write_json
from sparsa.ops.sparse_attn import blockwise, naive

HQ, HKV, D, BLOCK, TOPK = 8, 2, 64, 64, 8


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_path(path, q, k, v, idx, repeats: int):
    def forward():
        with torch.no_grad():
            path.sparse_attention(q, k, v, idx, block_size=BLOCK, scale=D**-0.5)

    def forward_backward():
        out, _ = path.sparse_attention(q, k, v, idx, block_size=BLOCK, scale=D**-0.5)
        out.sum().backward()

    return median_seconds(forward, repeats), median_seconds(forward_backward, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", default="1024,2048,4096,8192,16384", help="comma-separated sequence lengths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-limit", type=float, default=2**30, help="largest dense logits (elements) to run")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args()
    ns = [int(n) for n in args.ns.split(",")]
    if any(n <= 0 for n in ns):
        raise ValueError(f"--ns must hold positive lengths, got {args.ns!r}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    rows = []
    print(f"{'N':>6} {'path':>10} {'fwd s':>8} {'fwd+bwd s':>10} {'largest tensor (elements)':>26}  public op takes")
    for n in ns:
        gen = torch.Generator().manual_seed(n)
        q = torch.randn(1, n, HQ, D, generator=gen).requires_grad_()
        k = torch.randn(1, n, HKV, D, generator=gen).requires_grad_()
        v = torch.randn(1, n, HKV, D, generator=gen).requires_grad_()
        idx = torch.randint(0, -(-n // BLOCK), (1, n, HKV, TOPK), generator=gen)
        chosen = "dense" if blockwise.prefers_dense(q, idx, BLOCK) else "blockwise"
        dense_elements = HQ * n * n
        chunk = blockwise.chunk_tokens(1, HKV, HQ // HKV, TOPK * BLOCK, D, D)
        for name, path, largest in (("dense", naive, dense_elements),
                                    ("blockwise", blockwise, chunk * HKV * TOPK * BLOCK * (2 * D + 3 * HQ // HKV))):
            if name == "dense" and dense_elements > args.dense_limit:
                row = dict(n=n, path=name, forward_s=None, forward_backward_s=None, largest_elements=largest)
            else:
                fwd, fwd_bwd = time_path(path, q, k, v, idx, args.repeats)
                row = dict(n=n, path=name, forward_s=fwd, forward_backward_s=fwd_bwd, largest_elements=largest)
            rows.append(row | dict(public_op_path=chosen))
            fmt = (lambda x: "skipped" if x is None else f"{x:.3f}")
            print(f"{n:>6} {name:>10} {fmt(row['forward_s']):>8} {fmt(row['forward_backward_s']):>10} "
                  f"{largest:>26}  {chosen}", flush=True)
    if args.out:
        info = dict(date=str(datetime.date.today()), machine=platform.processor() or platform.machine(),
                    cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                    shape=dict(batch=1, hq=HQ, hkv=HKV, head_dim=D, block=BLOCK, topk=TOPK, dtype="float32"),
                    chunk_elements=blockwise.CHUNK_ELEMENTS)
        write_json(Path(args.out), dict(info=info, rows=rows))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
