"""A/B on the GPU: the KV-outer forward (no gradients) with the local blocks in their own kernel
(SPARSA_KV_LOCAL_SPLIT=1, kv_local.py) against every pair through MAIN and the merge (=0). Same process, the two
settings interleaved over two rounds, do_bench medians in ms (index build included); the split output is compared
with the unsplit one (not bitwise: another summation order), and dense causal SDPA is timed in the same run.
With --accuracy it first checks bf16 at --acc-size tokens against a float32 reference: the split forward's relative
error must stay within 2x that of a bf16 PyTorch reference (the issue's criterion), at |q.k| up to ~50.
With --profile it prints each kernel's GPU time of one split forward per shape. With --backward it also times
forward+backward with kv_local.WITH_GRAD off ("0") and on ("1g": the split forward, then the backward builds its own
pair index).

    PYTHONPATH=. python3 scripts/kv_local_split_ab.py [--sizes 8192,65536] [--groups 1,2,4,8,16] [--accuracy]
"""
import argparse
import functools
import json
import os

import torch

from benchmarks.sparse_attention import BS, bench, make, sparse_calls, time_dense
import sparsa
from sparsa.ops.sparse_attn import kv_local, naive


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def forward(q, k, v, idx):
    with torch.no_grad():
        return sparsa.sparse_attention(q, k, v, idx, block_size=BS, loop_order="kv_outer", return_lse=True)


def accuracy(n, group, logit):
    """{errors of the split and unsplit bf16 forwards and of a bf16 reference, against float32}."""
    q, k, v, idx = make(n, group)
    if logit:  # |q . k| * scale up to ~logit
        q, k = (x * (logit / q.shape[-1] ** 0.5) ** 0.5 * 1.5 for x in (q, k))
        q, k = q.to(v.dtype), k.to(v.dtype)
    scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        o32 = naive.sparse_attention(q.float(), k.float(), v.float(), idx, block_size=BS, scale=scale)[0]
        o16 = naive.sparse_attention(q, k, v, idx, block_size=BS, scale=scale)[0]
    row = {"N": n, "G": group, "logit": logit, "err_ref_bf16": rel(o16, o32)}
    for setting in ("0", "1"):
        os.environ["SPARSA_KV_LOCAL_SPLIT"] = setting
        o, lse = forward(q, k, v, idx)
        row[f"err_split{setting}"] = rel(o, o32)
        row[f"nan_split{setting}"] = bool(torch.isnan(o).any() or torch.isnan(lse).any())
    row["ok"] = (row["err_split1"] <= 2 * row["err_ref_bf16"]) and not row["nan_split1"]
    del q, k, v, o32, o16
    torch.cuda.empty_cache()
    return row


def kernel_times(fn):
    """{kernel name: GPU ms} of one call (after a warm-up call)."""
    fn()
    torch.cuda.synchronize()
    gpu = torch.cuda.is_available()  # (the CPU dry run lists CPU ops)
    act = torch.profiler.ProfilerActivity
    with torch.profiler.profile(activities=[act.CUDA if gpu else act.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type == (torch.autograd.DeviceType.CUDA if gpu else torch.autograd.DeviceType.CPU):
            out[e.key[:60]] = round((e.device_time_total if gpu else e.cpu_time_total) / 1000, 4)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="8192,65536")
    p.add_argument("--groups", default="1,2,4,8,16")
    p.add_argument("--accuracy", action="store_true")
    p.add_argument("--acc-size", type=int, default=4096)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--backward", action="store_true")
    p.add_argument("--rows", default="64x8",
                   help="ROWSxWARPS (kv_local.LOCAL_ROWS, LOCAL_WARPS) variants of the split forward, comma-separated")
    args = p.parse_args()
    groups = [int(g) for g in args.groups.split(",")]
    ok = True
    if args.accuracy:
        for group in groups:
            for logit in (None, 50.0):
                row = accuracy(args.acc_size, group, logit)
                ok &= row["ok"]
                print(json.dumps({"accuracy": row}), flush=True)
    for n in (int(x) for x in args.sizes.split(",")):
        dense = time_dense(n)[0]
        for group in groups:
            fn = functools.partial(forward, *make(n, group))
            os.environ["SPARSA_KV_LOCAL_SPLIT"] = "0"
            ref = fn()[0]
            for rnd in range(2):
                for setting in ["0"] + [f"1:{r}" for r in args.rows.split(",")]:
                    os.environ["SPARSA_KV_LOCAL_SPLIT"] = setting[0]
                    if setting != "0":
                        kv_local.LOCAL_ROWS, kv_local.LOCAL_WARPS = (int(x) for x in setting[2:].split("x"))
                    row = {"N": n, "G": group, "round": rnd, "split": setting, "fwd_ms": bench(fn),
                           "dense_fwd_ms": dense}
                    if setting != "0":
                        row["diff_vs_unsplit"] = rel(fn()[0], ref)
                    print(json.dumps(row), flush=True)
            kv_local.LOCAL_ROWS, kv_local.LOCAL_WARPS = (int(x) for x in args.rows.split(",")[0].split("x"))
            if args.backward:
                fwd_bwd = sparse_calls(n, group, "kv_outer")[1]
                for rnd in range(2):
                    for setting in ("0", "1g"):
                        os.environ["SPARSA_KV_LOCAL_SPLIT"] = setting[0]
                        kv_local.WITH_GRAD = setting == "1g"
                        print(json.dumps({"N": n, "G": group, "round": rnd, "split": setting,
                                          "fwdbwd_ms": bench(fwd_bwd)}), flush=True)
                kv_local.WITH_GRAD = False
                del fwd_bwd
            if args.profile:
                for setting in ("0", "1"):
                    os.environ["SPARSA_KV_LOCAL_SPLIT"] = setting
                    print(json.dumps({"N": n, "G": group, "split": setting, "kernels": kernel_times(fn)}), flush=True)
            del fn, ref
            torch.cuda.empty_cache()
    os.environ.pop("SPARSA_KV_LOCAL_SPLIT", None)
    print(json.dumps({"accuracy_ok": ok}) if args.accuracy else "")


if __name__ == "__main__":
    main()
