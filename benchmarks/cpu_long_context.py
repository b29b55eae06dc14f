"""The PyTorch (CPU) paths for long sequences against the one-piece dense references.

    PYTHONPATH=. python3 benchmarks/cpu_long_context.py [--ns 2048,8192,32768] [--ops sparse,window,compressed,kl]
        [--out results.json]

Ops (float32, batch 1, 8 query / 2 KV heads, head dim 64, forward+backward with gradients to every input):
  sparse      sparse_attention, block 64, top-8 random blocks: naive.py (dense [B, Hq, T, T] logits) against
              blockwise.py (gathered key blocks per token chunk, recomputing backward)
  window      sliding window 512: window/naive.py with positional_attention against compress/chunked.py's
              checkpointed query chunks
  compressed  compressed branch (length 32, stride 16): the same two
  kl          attention_kl, causal, teacher frozen: the one-piece reference against kl/row_chunks.py
Each measurement is the median of --repeats after one warm-up call; the dense side is skipped where its
logits would exceed --dense-limit elements. Prints a table; --out writes JSON (atomically) with the machine,
thread count, versions and date.
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
from sparsa.ops.compress import chunked as pos_chunked
from sparsa.ops.compress import naive as compress_naive
from sparsa.ops.kl import naive as kl_naive
from sparsa.ops.kl import row_chunks
from sparsa.ops.sparse_attn import blockwise
from sparsa.ops.sparse_attn import naive as sparse_naive
from sparsa.ops.window import naive as window_naive

HQ, HKV, D = 8, 2, 64
BLOCK, TOPK, WINDOW, C_LENGTH, C_STRIDE = 64, 8, 512, 32, 16
OPS = ("sparse", "window", "compressed", "kl")


def leaf(gen, *shape):
    return torch.randn(*shape, generator=gen).requires_grad_()


def make_call(op: str, path: str, n: int, gen):
    """(forward+backward callable, dense logits elements) for one op, path ("dense" or "chunked") and length."""
    q, k, v = leaf(gen, 1, n, HQ, D), leaf(gen, 1, n, HKV, D), leaf(gen, 1, n, HKV, D)
    if op == "sparse":
        idx = torch.randint(0, -(-n // BLOCK), (1, n, HKV, TOPK), generator=gen)
        impl = sparse_naive if path == "dense" else blockwise
        return (lambda: impl.sparse_attention(q, k, v, idx, block_size=BLOCK, scale=D**-0.5)[0]), HQ * n * n
    attend = compress_naive.positional_attention if path == "dense" else pos_chunked.chunked_positional_attention
    if op == "window":
        return (lambda: window_naive.window_attention(q, k, v, window=WINDOW, scale=D**-0.5, attend=attend)[0]), HQ * n * n
    if op == "compressed":
        n_keys = compress_naive.n_compressed(n, C_LENGTH, C_STRIDE)
        kc, vc = leaf(gen, 1, n_keys, HKV, D), leaf(gen, 1, n_keys, HKV, D)
        return (lambda: compress_naive.compressed_attention(q, kc, vc, length=C_LENGTH, stride=C_STRIDE, scale=D**-0.5,
                                                            attend=attend)[0]), HQ * n * n_keys
    q_s, k_s = leaf(gen, 1, n, HQ, D), leaf(gen, 1, n, HKV, D)
    impl = kl_naive if path == "dense" else row_chunks
    return (lambda: impl.attention_kl(q.detach(), k.detach(), q_s, k_s, causal=True, scale_t=D**-0.5,
                                      scale_s=D**-0.5)[0]), 2 * HQ * n * n


def median_seconds(call, repeats: int) -> float:
    call().sum().backward()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call().sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", default="2048,8192,32768", help="comma-separated sequence lengths")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-limit", type=float, default=2**29, help="largest dense logits (elements) to run")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args()
    ns = [int(n) for n in args.ns.split(",")]
    ops = args.ops.split(",")
    if any(n <= 0 for n in ns):
        raise ValueError(f"--ns must hold positive lengths, got {args.ns!r}")
    if any(op not in OPS for op in ops):
        raise ValueError(f"--ops must be a subset of {OPS}, got {args.ops!r}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    rows = []
    print(f"{'op':>10} {'N':>6} {'dense s':>9} {'chunked s':>10}  (forward+backward, median of {args.repeats})")
    for op in ops:
        for n in ns:
            row = dict(op=op, n=n)
            for path in ("dense", "chunked"):
                call, logits = make_call(op, path, n, torch.Generator().manual_seed(n))
                skip = path == "dense" and logits > args.dense_limit
                row[f"{path}_s"] = None if skip else median_seconds(call, args.repeats)
                row["dense_logits_elements"] = logits
            rows.append(row)
            fmt = (lambda x: "skipped" if x is None else f"{x:.3f}")
            print(f"{op:>10} {n:>6} {fmt(row['dense_s']):>9} {fmt(row['chunked_s']):>10}", flush=True)
    if args.out:
        info = dict(date=str(datetime.date.today()), machine=platform.processor() or platform.machine(),
                    cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                    shape=dict(batch=1, hq=HQ, hkv=HKV, head_dim=D, dtype="float32", block=BLOCK, topk=TOPK,
                               window=WINDOW, compress_length=C_LENGTH, compress_stride=C_STRIDE))
        write_json(Path(args.out), dict(info=info, rows=rows))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
