"""StreamKL launch overhead probe (GPU): host time per call against GPU time, and where the host time goes.

    PYTHONPATH=. python3 scripts/kl_overhead_probe.py [--sizes 2048,4096,8192] [--profile]

For each size: host enqueue time per call (forward, forward+backward; 200 calls, GPU not waited for
inside the loop), `do_bench` medians, a CUDA-graph replay of the forward (pure GPU time), the same
for SDPA, and the launch cost of an empty Triton kernel with as many arguments as the forward.
With --profile, a cProfile of 200 forward+backward calls at the first size (top rows by own time).
With --trace, a torch.profiler table of 20 forward+backward calls at the first size: GPU time per
kernel and host time per op, and the host time of the backward's pieces called directly.
"""
import argparse
import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import sparsa


@triton.jit
def _empty_kernel(x, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20,
                  a21, a22, a23, a24, a25, a26, a27, a28, a29, a30, B: tl.constexpr):
    pass


def host_ms(fn, calls=200):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e3
    torch.cuda.synchronize()
    return host


def graph_ms(fn):
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="2048,4096,8192")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--trace", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.zeros(1, device="cuda")
    ints = list(range(1, 31))
    empty = lambda: _empty_kernel[(1,)](x, *ints, B=1)
    print(f"empty Triton kernel, 31 args: host {host_ms(empty):.4f} ms/launch", flush=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    for n in sizes:
        q_t, k_t, q_s, k_s = (torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        q_s.requires_grad_(True)
        k_s.requires_grad_(True)
        fwd = lambda: sparsa.attention_kl(q_t, k_t, q_s, k_s)

        def fwd_bwd():
            q_s.grad = k_s.grad = None
            sparsa.attention_kl(q_t, k_t, q_s, k_s).backward()

        qd, kd, vd = (t.detach().transpose(1, 2).requires_grad_(True) for t in (q_s, k_s, k_t))

        def sdpa_fwd_bwd():
            qd.grad = kd.grad = vd.grad = None
            F.scaled_dot_product_attention(qd, kd, vd, is_causal=True).sum().backward()

        rows = {
            "kl fwd": (fwd, True),
            "kl fwd+bwd": (fwd_bwd, False),
            "sdpa fwd": (lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True), True),
            "sdpa fwd+bwd": (sdpa_fwd_bwd, False),
        }
        for name, (fn, graphable) in rows.items():
            host = host_ms(fn)
            bench = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            graph = ""
            if graphable:
                with torch.no_grad():
                    graph = f", graph replay {graph_ms(fn):.3f} ms"
            print(f"N={n} {name}: host {host:.3f} ms/call, do_bench {bench:.3f} ms{graph}", flush=True)
    if args.trace:
        trace(sizes[0])
    if args.profile:
        n = sizes[0]
        q_t, k_t, q_s, k_s = (torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        q_s.requires_grad_(True)
        for _ in range(5):
            sparsa.attention_kl(q_t, k_t, q_s, k_s).backward()
        torch.cuda.synchronize()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            sparsa.attention_kl(q_t, k_t, q_s, k_s).backward()
        pr.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22)
        print(s.getvalue()[:6000])


def trace(n):
    from sparsa.ops.kl import triton_ops

    q_t, k_t, q_s, k_s = (torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    q_s.requires_grad_(True)
    k_s.requires_grad_(True)

    def fwd_bwd():
        q_s.grad = k_s.grad = None
        sparsa.attention_kl(q_t, k_t, q_s, k_s).backward()

    for _ in range(5):
        fwd_bwd()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(20):
            fwd_bwd()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=16, max_name_column_width=50))
    scale = 128**-0.5
    kl, lse_p, lse_q = triton_ops.kl_forward(q_t, k_t, q_s.detach(), k_s.detach(), causal=True,
                                              scale_p=scale, scale_q=scale)
    grad = torch.ones((), device="cuda").expand(kl.shape)
    pieces = {
        "kl_forward (launch only)": lambda: triton_ops.kl_forward(
            q_t, k_t, q_s, k_s, causal=True, scale_p=scale, scale_q=scale),
        "kl_backward (2 launches)": lambda: triton_ops.kl_backward(
            q_t, k_t, q_s, k_s, kl, lse_p, lse_q, grad, causal=True, scale_p=scale, scale_q=scale,
            need_p=False, need_q=True),
        "attention_kl (no grad)": lambda: sparsa.attention_kl(q_t, k_t, q_s.detach(), k_s.detach()),
        "attention_kl fwd (grad)": lambda: sparsa.attention_kl(q_t, k_t, q_s, k_s),
        "fwd+bwd": fwd_bwd,
    }
    for name, fn in pieces.items():
        print(f"N={n} host {name}: {host_ms(fn):.3f} ms/call", flush=True)


if __name__ == "__main__":
    main()
