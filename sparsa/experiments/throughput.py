"""Training throughput (tokens/s) of full (dense-only), sparse-only and SSA training at long context."""
from __future__ import annotations

import sys
import time

import torch

from ..config import preset
from ..models import SparsaLM

METHODS = ("full", "sparse", "ssa")


def train_step_tokens_per_s(method: str, seq_len: int, steps: int = 5, warmup: int = 2, preset_name: str = "repro",
                            device: str = "cuda", seed: int = 0) -> float:
    """Median tokens/s of forward + backward + AdamW step on one sequence of `seq_len` random tokens."""
    torch.manual_seed(seed)
    config = preset(preset_name, max_seq_len=seq_len)
    model = SparsaLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, config.vocab_size, (1, seq_len + 1), device=device)
    mode = "sparse" if method == "sparse" else "full"
    times = []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            out = model(tokens[:, :-1], targets=tokens[:, 1:], mode=mode, align=method == "ssa")
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return seq_len / times[len(times) // 2]


def throughput_table(seq_lens=(8192, 32768), steps: int = 5, device: str = "cuda") -> list[dict]:
    rows = []
    for seq_len in seq_lens:
        for method in METHODS:
            try:
                rate = train_step_tokens_per_s(method, seq_len, steps=steps, device=device)
                rows.append({"seq_len": seq_len, "method": method, "tokens_per_s": rate})
            except torch.cuda.OutOfMemoryError:
                rows.append({"seq_len": seq_len, "method": method, "tokens_per_s": None, "error": "out of memory"})
                torch.cuda.empty_cache()
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(json.dumps(throughput_table(args.seq_lens, args.steps, args.device), indent=2))
