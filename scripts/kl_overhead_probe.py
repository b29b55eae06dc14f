"""StreamKL launch overhead probe (GPU): host enqueue time per call vs do_bench vs a CUDA-graph replay.

    PYTHONPATH=. python3 scripts/kl_overhead_probe.py

At 2K tokens the forward is bound by the host (Python checks, autograd, Triton launch), not the GPU.
"""
import time, torch, triton, cProfile, pstats, io
import sparsa
torch.manual_seed(0)
for n in (2048, 4096, 8192):
    q_t, k_t, q_s, k_s = (torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    q_s.requires_grad_(True); k_s.requires_grad_(True)
    f = lambda: sparsa.attention_kl(q_t, k_t, q_s, k_s)
    for _ in range(5): f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200): f()
    cpu = (time.perf_counter() - t0) / 200 * 1e3
    torch.cuda.synchronize()
    gpu = triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
    g = torch.cuda.CUDAGraph()
    with torch.no_grad():
        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3): sparsa.attention_kl(q_t, k_t, q_s.detach(), k_s.detach())
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            sparsa.attention_kl(q_t, k_t, q_s.detach(), k_s.detach())
    graph = triton.testing.do_bench(lambda: g.replay(), warmup=25, rep=100, return_mode="median")
    print(f"N={n}: enqueue {cpu:.3f} ms/call, do_bench {gpu:.3f} ms, graph replay {graph:.3f} ms", flush=True)
pr = cProfile.Profile(); pr.enable()
for _ in range(200): f()
pr.disable(); torch.cuda.synchronize()
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14); print(s.getvalue()[:3500])
