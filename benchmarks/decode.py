"""Decode throughput of the engine's modes at long context on one GPU (8B-like layer shape).

    PYTHONPATH=. python3 benchmarks/decode.py [--quick] [--layers 4] [--kv-heads 8] [--graph] [--hf]

Model: SparsaLM with hidden 4096, 32 query heads, `--kv-heads` KV heads, head dim 128, SwiGLU 14336,
vocabulary 32000, `--layers` layers (fewer than 8B's 32: every number is for this many layers),
random weights (bf16), random stand-in forecasts for sparda (`sparsa.serve.testing`).
Selection geometry as SparDA: block 64, top-96 blocks, 1 init block, 32 local blocks.

For each context and mode: the largest feasible batch (from the engine's memory plan against the
free GPU memory and the host's available memory), the prefill time of one prompt of that length,
GPU (and host) KV memory per sequence, and decode tokens/s at several batches. To keep the run
short, one prompt is prefilled and its cache copied into every batch row (`Engine.replicate`);
the decode then appends the greedy tokens of each row. Hugging Face transformers'
`DynamicCache(offloading=True)` runs on the same shape with `--hf` (default on at 32K).
Prints a markdown table; `--json` writes all numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time

import torch

from sparsa.checkpoint import write_json
from sparsa.config import ModelConfig, SparseConfig
from sparsa.models.llama import SparsaLM
from sparsa.serve import Engine
from sparsa.serve.cache import BlockKVCache, device_available_bytes, host_available_bytes
from sparsa.serve.testing import LocalitySelection, attach_standin_forecasts

MODES = ("dense", "sparse", "offload", "sparda")


def build_model(layers: int, kv_heads: int, max_len: int):
    cfg = ModelConfig(vocab_size=32000, n_layers=layers, d_model=4096, n_heads=32, n_kv_heads=kv_heads, head_dim=128,
                      d_ff=14336, max_seq_len=max_len, tie_embeddings=False, output_gate=False,
                      sparse=SparseConfig(block_size=64, topk=96, init_blocks=1, local_blocks=32))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = SparsaLM(cfg).to(torch.bfloat16)
        attach_standin_forecasts(model)
    return model.eval()


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()


def largest_batch(model, mode: str, max_len: int, host_fraction: float, cap: int, cfg=None,
                  dev_free: int | None = None) -> tuple[int, dict]:
    """Largest batch the memory plan accepts (device: free memory; host: a fraction of MemAvailable).
    `cfg` / `dev_free` override the model's config and the free device memory (full-depth plans)."""
    cfg = model.config if cfg is None else cfg
    dev_free = device_available_bytes(torch.device("cuda")) if dev_free is None else dev_free
    host_free = int(host_available_bytes() * host_fraction)

    def plan(b):
        probe = Engine.__new__(Engine)  # workspace estimate without allocating
        probe.model, probe.config, probe.max_len, probe.prefill_chunk, probe.mode = model, cfg, max_len, 2048, mode
        probe.block_size, probe.n_kv, probe.head_dim, probe.n_heads, probe.max_batch = (
            cfg.sparse.block_size, cfg.n_kv_heads, cfg.head_dim, cfg.n_heads, b)
        return BlockKVCache.plan(n_layers=cfg.n_layers, batch=b, n_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                                 max_len=max_len, block_size=cfg.sparse.block_size, slots=cfg.sparse.topk,
                                 offload_layers=[mode in ("offload", "sparda") and i > 0 for i in range(cfg.n_layers)],
                                 keep_kbar=mode != "dense", dtype=torch.bfloat16, device=torch.device("cuda"),
                                 workspace=probe._workspace_bytes())

    best = 0
    lo, hi = 1, cap
    while lo <= hi:
        mid = (lo + hi) // 2
        p = plan(mid)
        if p.device_total <= dev_free and p.host_cache <= host_free:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best, {"device_free_GiB": dev_free / 2**30, "host_budget_GiB": host_free / 2**30,
                  "limit": "cap" if best == cap else ("device" if plan(best + 1).device_total > dev_free else "host")}


def full_depth_capacity(model, contexts, modes, layers: int, host_fraction: float, cap: int) -> list[dict]:
    """Largest batches of the same shape with `layers` layers (e.g. 32, the 8B depth), from the memory
    plan alone: free device memory + this model's weights - the deeper model's weights."""
    cfg = dataclasses.replace(model.config, n_layers=layers)
    with torch.device("meta"):
        deep_params = sum(p.numel() for p in SparsaLM(cfg).parameters())
    here = sum(p.numel() * p.element_size() for p in model.parameters())
    deep_bytes = deep_params * next(model.parameters()).element_size()
    dev_free = device_available_bytes(torch.device("cuda")) + here - deep_bytes
    rows = []
    for context in contexts:
        for mode in modes:
            best, why = largest_batch(model, mode, context + 1024, host_fraction, cap, cfg=cfg, dev_free=dev_free)
            rows.append({"layers": layers, "context": context, "mode": mode, "largest_batch": best,
                         "limited_by": why["limit"], "device_free_GiB": dev_free / 2**30,
                         "host_budget_GiB": why["host_budget_GiB"], "weights_GiB": deep_bytes / 2**30})
    return rows


def time_decode(engine: Engine, batch: int, steps: int, use_graph: bool) -> dict:
    engine.set_batch(batch)
    tokens = torch.zeros(batch, dtype=torch.long, device="cuda")
    result = {"batch": batch}
    if use_graph:
        try:
            g, logits = engine.capture_graph(tokens)
            g.replay()
            engine.reset_counters()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                g.replay()
                tokens.copy_(logits.argmax(-1))
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
            c = engine.counters()
            result.update(graph_tokens_per_s=batch * steps / (ms / 1e3), graph_ms_per_step=ms / steps,
                          graph_hit_rate=c["hit_rate"])
            engine.graph = None
            del g
        except Exception as err:  # fall back to eager
            result["graph_error"] = repr(err)[:200]
    if True:  # eager (also measures the prefetch wait, which graphs do not record)
        for _ in range(2):
            tokens = engine.decode_step(tokens).argmax(-1)
        engine.reset_counters()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            tokens = engine.decode_step(tokens).argmax(-1)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
    c = engine.counters()
    result.update(ms_per_step=ms / steps, tokens_per_s=batch * steps / (ms / 1e3), hit_rate=c["hit_rate"],
                  GB_moved_per_step=c["bytes_moved"] / steps / 1e9,
                  prefetch_wait_ms_per_step=c["prefetch_wait_s"] * 1e3 / steps)
    return result


def run_mode(model, mode, context, batches, steps, use_graph, host_fraction, max_cap, run_largest, host_rows=8,
             retention=None):
    step_room = (len(batches) + 1) * (2 * steps + 8) + 64
    max_len = context + step_room
    largest, why = largest_batch(model, mode, max_len, host_fraction, max_cap)
    out = {"mode": mode, "context": context, "largest_batch": largest, "largest_limited_by": why["limit"], "runs": []}
    if largest == 0:
        out["error"] = "does not fit"
        return out
    todo = sorted({b for b in batches if b <= largest} | ({largest} if run_largest else set()))
    cap = max(todo)
    engine = Engine(model, mode=mode, max_batch=cap, max_len=max_len, prefill_chunk=2048,
                    host_memory_limit=int(host_available_bytes() * host_fraction))
    if retention is not None:
        engine.selection_model = LocalitySelection(retention)
        out["retention"] = retention
    try:
        _measure(engine, out, context, todo, cap, steps, use_graph, host_rows)
    finally:  # release the cache even after an error (an exception's frames would keep it alive)
        engine.close()
        del engine
        free_memory()
    return out


def _measure(engine, out, context, todo, cap, steps, use_graph, host_rows):
    out["gpu_kv_MiB_per_seq"] = engine.cache.device_bytes_per_sequence() / 2**20
    out["host_kv_MiB_per_seq"] = engine.cache.host_bytes_per_sequence() / 2**20
    prompt = torch.randint(0, 32000, (context,), generator=torch.Generator().manual_seed(1)).tolist()
    engine.prefill([prompt[: 2 * engine.prefill_chunk + 1]])  # compile and tune before timing
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.prefill([prompt])
    torch.cuda.synchronize()
    out["prefill_s"] = time.perf_counter() - t0
    engine.replicate(cap, host_rows=host_rows)
    out["host_rows_copied"] = min(cap, host_rows)
    for b in todo:
        try:
            out["runs"].append(time_decode(engine, b, steps, use_graph))
        except Exception as err:
            out["runs"].append({"batch": b, "error": repr(err)[:300]})
        engine.graph = None
        free_memory()


def run_hf(layers, kv_heads, context, batches, steps):
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=kv_heads, head_dim=128,
                      max_position_embeddings=context + 1024, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    runs = []
    for b in batches:
        try:
            ids = torch.randint(0, 32000, (b, context), device="cuda")
            cache = DynamicCache(config=model.config, offloading=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
            prefill_s = time.perf_counter() - t0
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            with torch.no_grad():
                for i in range(2 + steps):
                    if i == 2:
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                    out = model(input_ids=tok, past_key_values=cache, use_cache=True)
                    tok = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            runs.append({"batch": b, "prefill_s": prefill_s, "tokens_per_s": b * steps / dt, "ms_per_step": dt / steps * 1e3})
            del cache, out
        except Exception as err:
            runs.append({"batch": b, "error": repr(err)[:300]})
        free_memory()
    del model
    free_memory()
    return {"mode": "hf_offloaded_dynamic_cache", "context": context, "runs": runs}


def hit_rate_study(checkpoint: str, context: int, new_tokens: int, device: str, threads: int | None) -> list[dict]:
    """Hit rates of a trained model (e.g. SmolLM2-135M converted with `sparsa convert`) on text:
    offload (selection by each layer's query) and sparda with forecasts warm-started from the next
    layer's queries (`add_forecasts(init="query")`, untrained) or loaded from the checkpoint."""
    from sparsa.checkpoint import load_model
    from sparsa.data import load_documents
    from sparsa.serve.cli import load_text_tokenizer

    if threads:
        torch.set_num_threads(threads)
    model, _ = load_model(checkpoint, device=device)
    tok = load_text_tokenizer(checkpoint, model.config.vocab_size)
    text = "\n".join(t for _, t in load_documents(None))
    ids = tok.encode(text[: context * 8])[:context]
    rows = []
    for mode in ("offload", "sparda"):
        if mode == "sparda" and not model.has_forecasts:
            model.add_forecasts(init="query")
        eng = Engine(model, mode=mode, max_batch=1, max_len=context + new_tokens + 1, prefill_chunk=256)
        t0 = time.perf_counter()
        r = eng.generate([ids], max_new_tokens=new_tokens)
        c = r.counters
        rows.append({"mode": mode, "context": len(ids), "new_tokens": r.steps, "hit_rate": c["hit_rate"],
                     "block_lookups": c["block_lookups"], "bytes_moved": c["bytes_moved"],
                     "seconds": time.perf_counter() - t0, "text": tok.decode(r.tokens[0])[:80]})
        print(json.dumps(rows[-1]), flush=True)
        eng.close()
    return rows


def table(results, args) -> str:
    lines = [f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, layers {args.layers}, "
             f"KV heads {args.kv_heads}, block 64, top-96 (1 init + 32 local), bf16, graph={args.graph}, "
             f"steps {args.steps}, selections: "
             + (f"synthetic, retention {args.retention}" if args.retention is not None else "the model's own"), "",
             "| context | mode | largest batch (limit) | GPU KV MiB/seq | host KV MiB/seq | prefill s (1 seq) | "
             "batch: eager tokens/s [/ CUDA graph tokens/s] (hit rate, prefetch wait ms/step) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if r["mode"].startswith("hf"):
            cells = ", ".join(f"{x['batch']}: {x['tokens_per_s']:.1f}" if "tokens_per_s" in x else f"{x['batch']}: {x['error'][:60]}"
                              for x in r["runs"])
            pre = ", ".join(f"{x['prefill_s']:.2f}" for x in r["runs"] if "prefill_s" in x)
            lines.append(f"| {r['context']} | HF DynamicCache(offloading=True) | - | - | - | {pre} | {cells} |")
            continue
        if "error" in r:
            lines.append(f"| {r['context']} | {r['mode']} | 0 | - | - | - | {r['error']} |")
            continue
        cells = []
        for x in r["runs"]:
            if "tokens_per_s" not in x:
                cells.append(f"{x['batch']}: error {x.get('error', '')[:60]}")
                continue
            extra = "" if r["mode"] in ("dense", "sparse") else \
                f" ({x['hit_rate']:.2f}, {x['prefetch_wait_ms_per_step']:.2f})"
            g = f" / graph {x['graph_tokens_per_s']:.0f}" if "graph_tokens_per_s" in x else ""
            cells.append(f"{x['batch']}: {x['tokens_per_s']:.0f}{g}{extra}")
        lines.append(f"| {r['context']} | {r['mode']} | {r['largest_batch']} ({r['largest_limited_by']}) | "
                     f"{r['gpu_kv_MiB_per_seq']:.0f} | {r['host_kv_MiB_per_seq']:.0f} | {r['prefill_s']:.2f} | "
                     f"{'; '.join(cells)} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 layers, batches 1 and 8, 8 steps, largest batch not run")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--modes", nargs="+", default=list(MODES))
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--graph", action="store_true", help="time CUDA-graph replays of the decode step")
    p.add_argument("--no-largest", action="store_true", help="do not run the largest feasible batch")
    p.add_argument("--max-batch-cap", type=int, default=512)
    p.add_argument("--host-rows", type=int, default=8,
                   help="rows whose host KV is copied from the prefilled prompt (others: zero pages, same volume)")
    p.add_argument("--host-fraction", type=float, default=0.8, help="share of MemAvailable the host cache may use")
    p.add_argument("--hf", type=int, nargs="*", default=None, help="HF offloaded-cache batches at 32K (default 1)")
    p.add_argument("--json", default=None)
    p.add_argument("--retention", type=float, default=None,
                   help="synthetic decode selections keeping this share of the previous step's blocks "
                        "(sparsa.serve.testing.LocalitySelection; trained models: about 0.75)")
    p.add_argument("--full-depth", type=int, default=32,
                   help="also report the largest batches of this many layers from the memory plan (0: skip)")
    p.add_argument("--hit-rate", default=None, metavar="CHECKPOINT",
                   help="instead: hit rates of a trained checkpoint on text (CPU works), see hit_rate_study")
    p.add_argument("--hit-context", type=int, default=2048)
    p.add_argument("--hit-new-tokens", type=int, default=32)
    p.add_argument("--device", default=None, help="--hit-rate only: cpu | cuda")
    p.add_argument("--threads", type=int, default=None, help="--hit-rate only: torch CPU threads")
    args = p.parse_args()
    if args.hit_rate:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        rows = hit_rate_study(args.hit_rate, args.hit_context, args.hit_new_tokens, device, args.threads)
        if args.json:
            write_json(args.json, {"args": vars(args), "hit_rate_study": rows}, default=float)
        return
    args.layers = args.layers or (2 if args.quick else 4)
    args.batches = args.batches or ([1, 8] if args.quick else [1, 4, 16, 32, 64])
    args.steps = args.steps or (8 if args.quick else 16)
    run_largest = not (args.quick or args.no_largest)
    model = build_model(args.layers, args.kv_heads, max(args.contexts) + 4096)
    results = []
    for context in args.contexts:
        for mode in args.modes:
            t0 = time.perf_counter()
            try:
                r = run_mode(model, mode, context, args.batches, args.steps, args.graph, args.host_fraction,
                             args.max_batch_cap, run_largest, args.host_rows, args.retention)
            except Exception as err:
                r = {"mode": mode, "context": context, "error": repr(err)[:300]}
            free_memory()  # after the except block: the exception no longer pins the engine's memory
            r["wall_s"] = time.perf_counter() - t0
            results.append(r)
            print(json.dumps(r, default=float), flush=True)
    capacity = []
    if args.full_depth:
        capacity = full_depth_capacity(model, args.contexts, [m for m in args.modes if m in MODES], args.full_depth,
                                       args.host_fraction, args.max_batch_cap)
        for r in capacity:
            print(json.dumps(r, default=float), flush=True)
    hf_batches = [1] if args.hf is None or len(args.hf) == 0 else args.hf
    if 32768 in args.contexts:
        del model
        free_memory()
        try:
            r = run_hf(args.layers, args.kv_heads, 32768, hf_batches, max(4, args.steps // 2))
        except Exception as err:
            r = {"mode": "hf_offloaded_dynamic_cache", "context": 32768, "runs": [{"batch": 0, "error": repr(err)[:300]}]}
        results.append(r)
        print(json.dumps(r, default=float), flush=True)
    md = table(results, args)
    if capacity:
        md += "\n\nLargest batches with {} layers (memory plan only; weights {:.1f} GiB, device free {:.1f} GiB, " \
              "host budget {:.1f} GiB):\n\n| context | mode | largest batch | limited by |\n|---|---|---|---|\n".format(
                  args.full_depth, capacity[0]["weights_GiB"], capacity[0]["device_free_GiB"], capacity[0]["host_budget_GiB"])
        md += "\n".join(f"| {r['context']} | {r['mode']} | {r['largest_batch']} | {r['limited_by']} |" for r in capacity)
    print(md)
    if args.json:
        write_json(args.json, {"args": vars(args), "results": results, "full_depth_capacity": capacity, "table": md},
                   default=float)


if __name__ == "__main__":
    main()
