"""Where a decode step's GPU time goes: torch.profiler over eager decode steps of one engine mode.

    PYTHONPATH=. python3 benchmarks/profile_decode.py --mode sparda --context 32768 --batch 8 [--layers 4]

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
    args = p.parse_args()
    model = build_model(args.layers, 8, args.context + 1024)
    eng = Engine(model, mode=args.mode, max_batch=args.batch, max_len=args.context + 256, prefill_chunk=2048)
    eng.selection_model = LocalitySelection(args.retention)
    prompt = torch.randint(0, 32000, (args.context,), generator=torch.Generator().manual_seed(1)).tolist()
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


if __name__ == "__main__":
    main()
