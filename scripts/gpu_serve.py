"""GPU checks of the engine's CUDA-only paths: pinned/registered host KV read by the UVA gather
kernel, the prefetch side stream with events, CUDA-graph capture of a decode step, the Triton block
attention, and exact equality of offload / sparda with sparse on the GPU.

    PYTHONPATH=. python3 scripts/gpu_serve.py [--out results.json]

Every check prints PASS / FAIL and the script keeps going after a failure; exit code 1 if any failed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

os.environ.setdefault("SPARSA_BACKEND", "auto")

from sparsa.checkpoint import write_json  # noqa: E402
from sparsa.config import ModelConfig, SparseConfig  # noqa: E402
from sparsa.models.llama import SparsaLM  # noqa: E402
from sparsa.serve import Engine  # noqa: E402
from sparsa.serve.attend import block_attention_reference, block_attention_triton  # noqa: E402
from sparsa.serve.cache import allocate_host  # noqa: E402
from sparsa.serve.gather import gather_blocks  # noqa: E402
from sparsa.serve.testing import attach_standin_forecasts  # noqa: E402

RESULTS: dict = {}
FAILED: list = []


def check(name):
    def wrap(fn):
        def run(*a, **kw):
            t0 = time.perf_counter()
            try:
                info = fn(*a, **kw)
                RESULTS[name] = {"ok": True, "info": info, "s": round(time.perf_counter() - t0, 2)}
                print(f"PASS {name} ({time.perf_counter() - t0:.1f}s) {info if info else ''}", flush=True)
            except Exception as err:  # keep going
                FAILED.append(name)
                RESULTS[name] = {"ok": False, "error": repr(err)}
                print(f"FAIL {name}: {err!r}", flush=True)
                traceback.print_exc()
        return run
    return wrap


def small_model(dtype, seed=0, std=0.15):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=256, n_layers=3, d_model=256, n_heads=8, n_kv_heads=2, d_ff=512, max_seq_len=1024,
                      sparse=SparseConfig(block_size=16, topk=8, init_blocks=1, local_blocks=2))
    with torch.device("cuda"):
        model = SparsaLM(cfg)
        attach_standin_forecasts(model)
    for p in model.parameters():
        if p.ndim == 2:
            torch.nn.init.normal_(p, std=std)
    return model.to(dtype).eval()


def data(seed, lengths, n_new):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]
    cont = torch.randint(0, 256, (len(lengths), n_new), generator=g).cuda()
    return prompts, cont


def teacher_forced(engine, prompts, cont):
    out = [engine.prefill(prompts)]
    for i in range(cont.shape[1]):
        out.append(engine.decode_step(cont[:, i]))
    return torch.stack(out, dim=1)


@check("gather kernel reads pinned host memory (exact)")
def check_gather():
    host, registered = allocate_host((2, 4, 3, 64, 64, 128), torch.bfloat16, pin=True)
    host.copy_(torch.randn(host.shape).to(torch.bfloat16))
    hk, hv = host[0], host[1]
    load = torch.randint(-1, 64, (4, 3, 24), device="cuda")
    sk = torch.full((4, 3, 24, 64, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
    sv = sk.clone()
    gather_blocks(hk, hv, sk, sv, load, method="kernel")
    torch.cuda.synchronize()
    ref_k, ref_v = sk.cpu().clone(), sv.cpu().clone()
    ref_k.fill_(float("nan"))
    ref_v.fill_(float("nan"))
    gather_blocks(hk, hv, ref_k, ref_v, load.cpu(), method="index")
    ok = torch.equal(sk.cpu().float().nan_to_num(5), ref_k.float().nan_to_num(5)) and \
        torch.equal(sv.cpu().float().nan_to_num(5), ref_v.float().nan_to_num(5))
    assert ok, "kernel gather differs from indexing"
    return {"registered": registered, "is_pinned": bool(host.is_pinned())}


@check("gather bandwidth: UVA kernel vs per-block copies vs staged bulk copy")
def check_gather_speed():
    import triton.testing as tt

    batch, heads, nb, slots = 8, 8, 1024, 96
    host, _ = allocate_host((2, batch, heads, nb, 64, 128), torch.bfloat16, pin=True)
    host.normal_()
    hk, hv = host[0], host[1]
    sk = torch.empty((batch, heads, slots, 64, 128), dtype=torch.bfloat16, device="cuda")
    sv = torch.empty_like(sk)
    load = torch.stack([torch.randperm(nb)[:slots] for _ in range(batch * heads)]).view(batch, heads, slots).cuda()
    nbytes = 2 * load.numel() * 64 * 128 * 2
    out = {"bytes": nbytes, "block_bytes": 64 * 128 * 2}
    for ctas in (16, 32, 64, 132):
        ms = tt.do_bench(lambda c=ctas: gather_blocks(hk, hv, sk, sv, load, method="kernel", n_ctas=c), warmup=25, rep=200,
                         return_mode="median")
        out[f"kernel_{ctas}cta_GBps"] = round(nbytes / ms / 1e6, 1)
    ms = tt.do_bench(lambda: gather_blocks(hk, hv, sk, sv, load, method="staged"), warmup=10, rep=100,
                     return_mode="median")
    out["staged_GBps"] = round(nbytes / ms / 1e6, 1)
    small = load[:1, :2]  # copies: one cudaMemcpyAsync per block, fewer blocks (slow)
    nb_small = 2 * small.numel() * 64 * 128 * 2
    ms = tt.do_bench(lambda: gather_blocks(hk[:1], hv[:1], sk[:1, :2], sv[:1, :2], small, method="copies"),
                     warmup=5, rep=50, return_mode="median")
    out["copies_GBps"] = round(nb_small / ms / 1e6, 1)
    bulk = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    src = hk.reshape(-1)[: nbytes // 2]
    ms = tt.do_bench(lambda: bulk.copy_(src, non_blocking=True), warmup=10, rep=100, return_mode="median")
    out["bulk_h2d_GBps"] = round(nbytes / 2 / ms / 1e6, 1)
    return out


@check("block attention kernel vs reference (bf16, tail, splits)")
def check_attention():
    g = torch.Generator(device="cuda").manual_seed(0)
    r, hq, h, d, bs, s, k = 5, 32, 8, 128, 64, 40, 24
    q = torch.randn(r, hq, d, device="cuda", generator=g).bfloat16()
    pk = torch.randn(r, h, s, bs, d, device="cuda", generator=g).bfloat16()
    pv = torch.randn(r, h, s, bs, d, device="cuda", generator=g).bfloat16()
    tk, tv = pk[:, :, 0].clone(), pv[:, :, 0].clone()
    pos = torch.tensor([5000, 64 * 30 + 3, 64, 63, 64 * 23], device="cuda")
    rows = []
    for c in (pos // bs).tolist():
        n = min(k, c + 1)
        chosen = sorted(torch.randperm(c)[: n - 1].tolist() + [c]) if c > 0 else [0]
        rows.append(chosen + [-1] * (k - len(chosen)))
    blk = torch.tensor(rows, device="cuda")[:, None].expand(r, h, k).contiguous()
    idx = torch.where(blk >= 0, torch.randint(0, s, (r, h, k), device="cuda", generator=g), -1)
    ref = block_attention_reference(q.double(), pk.double(), pv.double(), idx, blk, pos, block_size=bs, scale=d ** -0.5,
                                    tail_k=tk.double(), tail_v=tv.double())
    errs = {}
    for splits in (1, 4, 24):
        got = block_attention_triton(q, pk, pv, idx, blk, pos, block_size=bs, scale=d ** -0.5, tail_k=tk, tail_v=tv,
                                     n_splits=splits)
        errs[splits] = float((got.double() - ref).norm() / ref.norm())
        assert errs[splits] < 1e-2, errs
    return {"rel_err": errs}


@check("fp32 on GPU: offload == sparse and sparda == sparse (same selections), exactly")
def check_exact():
    model = small_model(torch.float32)
    prompts, cont = data(1, (300, 171, 40), 40)
    sparse = Engine(model, mode="sparse", max_batch=3, prefill_chunk=128)
    sparse.record = {}
    ref = teacher_forced(sparse, prompts, cont)
    off = Engine(model, mode="offload", max_batch=3, prefill_chunk=128)
    got = teacher_forced(off, prompts, cont)
    assert torch.equal(got, ref), f"offload differs from sparse by {(got - ref).abs().max()}"
    sparda = Engine(model, mode="sparda", max_batch=3, prefill_chunk=128)
    sparda.record = {}
    got2 = teacher_forced(sparda, prompts, cont)
    sparse2 = Engine(model, mode="sparse", max_batch=3, prefill_chunk=128)
    sparse2.replay = sparda.record
    ref2 = teacher_forced(sparse2, prompts, cont)
    assert torch.equal(got2, ref2), f"sparda differs from sparse by {(got2 - ref2).abs().max()}"
    c1, c2 = off.counters(), sparda.counters()
    for e in (off, sparda):
        e.close()
    return {"offload": {k: c1[k] for k in ("hit_rate", "bytes_moved")},
            "sparda": {k: c2[k] for k in ("hit_rate", "bytes_moved", "prefetch_wait_s")}}


@check("fp32 on GPU: dense decode == full forward, sparse decode == sparse forward (tolerance)")
def check_forward():
    os.environ["SPARSA_BACKEND"] = "naive"  # the model's own forward through the reference ops
    try:
        model = small_model(torch.float32, seed=3)
        prompts, cont = data(2, (200, 77), 30)
        out = {}
        for mode, fmode in (("dense", "full"), ("sparse", "sparse")):
            eng = Engine(model, mode=mode, max_batch=2, prefill_chunk=64)
            got = teacher_forced(eng, prompts, cont)
            worst = 0.0
            for b, p in enumerate(prompts):
                seq = torch.tensor(p, device="cuda")[None]
                seq = torch.cat([seq, cont[b:b + 1]], dim=1)
                with torch.no_grad():
                    ref = model(seq, mode=fmode).logits[0, len(p) - 1:]
                worst = max(worst, float((got[b] - ref).abs().max() / ref.abs().max()))
            out[mode] = worst
            assert worst < 1e-4, out
        return {"max_rel_err": out}
    finally:
        os.environ["SPARSA_BACKEND"] = "auto"


@check("bf16: all modes generate; offload and sparse give identical tokens; streams + events in sparda")
def check_bf16():
    model = small_model(torch.bfloat16, seed=5)
    prompts, _ = data(3, (500, 300, 64, 900), 0)
    toks, info = {}, {}
    for mode in ("dense", "sparse", "offload", "sparda"):
        eng = Engine(model, mode=mode, max_batch=4, prefill_chunk=256)
        r = eng.generate(prompts, max_new_tokens=64, temperature=0.8, top_p=0.95, seed=7)
        toks[mode] = r.tokens
        info[mode] = {"hit_rate": r.counters["hit_rate"], "wait_ms": round(r.counters["prefetch_wait_s"] * 1e3, 3),
                      "decode_s": round(r.decode_s, 3)}
        eng.close()
    assert toks["offload"] == toks["sparse"], "offload tokens differ from sparse"
    return info


@check("CUDA graph: captured decode steps == eager decode steps (sparse, offload, sparda)")
def check_graph():
    model = small_model(torch.bfloat16, seed=6)
    prompts, cont = data(4, (400, 250), 12)
    out = {}
    for mode in ("sparse", "offload", "sparda"):
        eager = Engine(model, mode=mode, max_batch=2, prefill_chunk=256)
        graph = Engine(model, mode=mode, max_batch=2, prefill_chunk=256)
        eager.prefill(prompts)
        graph.prefill(prompts)
        static = cont[:, 0].clone()
        for i in range(2):  # capture_graph runs 2 warm-up steps with static's first token
            eager.decode_step(static)
        g, logits = graph.capture_graph(static)  # capturing records the step, it runs nothing
        worst = 0.0
        for i in range(cont.shape[1]):
            static.copy_(cont[:, i])
            g.replay()
            ref = eager.decode_step(cont[:, i])
            worst = max(worst, float((logits - ref).abs().max()))
        out[mode] = {"max_abs_diff": worst}
        assert worst == 0.0, out
        eager.close()
        graph.close()
    return out


@check("static decode: no host synchronisation inside decode_step (sparda, bf16)")
def check_no_sync():
    model = small_model(torch.bfloat16, seed=8)
    prompts, cont = data(5, (300, 200), 4)
    eng = Engine(model, mode="sparda", max_batch=2, prefill_chunk=256, timing=False)
    eng.prefill(prompts)
    eng.decode_step(cont[:, 0])
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 4):
            eng.decode_step(cont[:, i])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    eng.close()
    return None


@check("generate(cuda_graph=True) == eager generate: same tokens and counters (sparse, offload, sparda, bf16)")
def check_generate_graph():
    model = small_model(torch.bfloat16, seed=9)
    prompts, _ = data(9, (380, 120), 1)
    out = {}
    for mode in ("sparse", "offload", "sparda"):
        runs = {}
        for graph in (False, True):
            eng = Engine(model, mode=mode, max_batch=2, prefill_chunk=256)
            runs[graph] = eng.generate(prompts, max_new_tokens=40, cuda_graph=graph)
            eng.close()
        assert runs[True].tokens == runs[False].tokens, f"{mode}: tokens differ"
        for key in ("decode_steps", "block_lookups", "block_hits"):
            assert runs[True].counters[key] == runs[False].counters[key], (mode, key)
        out[mode] = {"decode_s_eager": round(runs[False].decode_s, 3), "decode_s_graph": round(runs[True].decode_s, 3)}
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: nothing to check")
        return 0
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    for fn in (check_gather, check_attention, check_exact, check_forward, check_bf16, check_graph, check_generate_graph,
               check_no_sync, check_gather_speed):
        fn()
        torch.cuda.empty_cache()
    if args.out:
        write_json(args.out, RESULTS, default=str)
    print(f"{len(RESULTS) - len(FAILED)} passed, {len(FAILED)} failed: {FAILED}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
