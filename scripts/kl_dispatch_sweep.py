"""Forward of `sparsa.attention_kl` through the public API with the Triton kernel and with each Gluon
config, against SDPA, at every size, in one process: the data behind the Gluon dispatch rule
(`gluon_fwd.choose_config`).

    PYTHONPATH=. python3 scripts/kl_dispatch_sweep.py [--sizes 2048,...] [--configs 64,64,4,2,0,1 ws,64,4,1 ...]

H = 32, D = 128, causal, bf16, teacher frozen, batch 1; do_bench medians in ms. Each size times SDPA, then
the Triton kernel (SPARSA_KL_GLUON=0), each config (SPARSA_KL_GLUON=1, SPARSA_KL_GLUON_CONFIG=config),
the automatic choice (variables unset), and the Triton kernel again (the spread of one version). A JSON
line per size, a table last; `--out DIR` also writes kl_dispatch_sweep.json there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sparsa  # noqa: E402

H, D = 32, 128
DEFAULT_CONFIGS = ["64,64,4,2,0,1", "64,64,4,3,0,1", "64,64,4,2,1,0", "ws,64,4,1", "ws,64,3,1", "ws,64,2,1"]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _set_env(values: dict) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def with_env(values: dict, fn):
    """fn() with the given environment variables set (None: unset), restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        _set_env(values)
        return fn()
    finally:
        _set_env(saved)


def sdpa_ms(q, k) -> float:
    """Causal SDPA forward of the same shape (k as the values)."""
    qh, kh = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
    return bench(lambda: F.scaled_dot_product_attention(qh, kh, kh, is_causal=True))


def sweep_size(n: int, configs: list[str]) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(n)
    q_t, k_t, q_s, k_s = (torch.randn(1, n, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
                          for _ in range(4))

    def kl_fwd():
        return sparsa.attention_kl(q_t, k_t, q_s, k_s)

    row = {"N": n}
    with torch.no_grad():
        row["sdpa"] = sdpa_ms(q_t, k_t)
        off = {"SPARSA_KL_GLUON": "0", "SPARSA_KL_GLUON_CONFIG": None}
        row["triton"] = with_env(off, lambda: bench(kl_fwd))
        ref = with_env(off, kl_fwd)
        for cfg in configs:
            env = {"SPARSA_KL_GLUON": "1", "SPARSA_KL_GLUON_CONFIG": cfg}
            out = with_env(env, kl_fwd)
            row[f"diff {cfg}"] = (out - ref).abs().item()
            row[cfg] = with_env(env, lambda: bench(kl_fwd))
        auto = {"SPARSA_KL_GLUON": None, "SPARSA_KL_GLUON_CONFIG": None}
        row["auto"] = with_env(auto, lambda: bench(kl_fwd))
        row["triton (again)"] = with_env(off, lambda: bench(kl_fwd))
    torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2048,4096,8192,16384,32768,65536,131072")
    ap.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", flush=True)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        rows.append(sweep_size(n, args.configs))
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            tmp = os.path.join(args.out, "kl_dispatch_sweep.json.tmp")
            with open(tmp, "w") as f:
                json.dump(rows, f, indent=1)
            os.replace(tmp, os.path.join(args.out, "kl_dispatch_sweep.json"))
    names = ["triton", *args.configs, "auto", "triton (again)"]
    print("\nforward ms / SDPA ratio")
    print("| N | SDPA | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 2) + "|")
    for r in rows:
        cells = [f"{r[k]:.3f} ({r[k] / r['sdpa']:.2f}x)" for k in names]
        print(f"| {r['N']} | {r['sdpa']:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
