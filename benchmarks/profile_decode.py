"""Where a decode step's GPU time goes: torch.profiler over eager decode steps of one engine mode.

    PYTHONPATH=. python3 benchmarks/profile_decode.py --mode sparda --context 32768 --batch 8 [--layers 4]
    PYTHONPATH=. python3 benchmarks/profile_decode.py --mode sparse --prefill [--context 32768 --layers 2]

With --prefill: the same for one prompt's prefill (after a warm-up prefill), CPU and CUDA time.

Same model as benchmarks/decode.py (8B-like layer shape, random weights, stand-in forecasts);
prints the CUDA kernels that take the most time per step and the step's total.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.decode import build_model
from sparsa.serve import Engine
from sparsa.serve.testing import LocalitySelection


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="sparda", choices=["dense", "sparse", "offload", "sparda"])
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--retention", type=float, default=0.75)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--prefill", action="store_true", help="profile a prefill instead of decode steps")
    args = p.parse_args()
    model = build_model(args.layers, 8, args.context + 1024)
    eng = Engine(model, mode=args.mode, max_batch=args.batch, max_len=args.context + 256, prefill_chunk=2048)
    eng.selection_model = LocalitySelection(args.retention)
    prompt = torch.randint(0, 32000, (args.context,), generator=torch.Generator().manual_seed(1)).tolist()
    if args.prefill:
        profile_prefill(eng, prompt, args)
        return
    eng.prefill([prompt])
    eng.replicate(args.batch)
    tokens = torch.zeros(args.batch, dtype=torch.long, device="cuda")
    for _ in range(3):
        tokens = eng.decode_step(tokens).argmax(-1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            tokens = eng.decode_step(tokens).argmax(-1)
        torch.cuda.synchronize()
    events = prof.key_averages()
    cuda = [e for e in events if e.device_type.name == "CUDA"]
    total = sum(e.device_time_total for e in cuda) / args.steps
    launches = sum(e.count for e in cuda) / args.steps
    print(f"mode {args.mode}, context {args.context}, batch {args.batch}, layers {args.layers}: "
          f"{total / 1e3:.3f} ms of kernels per step (all streams), {launches:.0f} kernels per step")
    print(events.table(sort_by="device_time_total", row_limit=args.rows, max_name_column_width=60))
    eng.close()


def profile_prefill(eng, prompt, args):
    import time

    eng.prefill([prompt[: 2 * eng.prefill_chunk + 1]])  # compile and tune first
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        eng.prefill([prompt])
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    print(f"prefill, mode {args.mode}, context {args.context}, layers {args.layers}: {wall:.3f} s (under the profiler)")
    events = prof.key_averages()
    print(events.table(sort_by="cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    print(events.table(sort_by="device_time_total", row_limit=args.rows, max_name_column_width=60))
    eng.close()


if __name__ == "__main__":
    main()
