"""Measured floors of both loop orders on random selections: how fast can any kernel of each design be (GPU)?

    PYTHONPATH=. python3 scripts/gather_floor.py [--ns 8192,16384,65536] [--gs 4,8,16] [--out FILE.json]

The query-outer order (one program per token and KV head, the NSA design; also the one-token query tiles) must
bring every selected block's K and V on chip for each (token, KV head): with random selections no two tokens
share a block's load. `_gather_kernel` does exactly those loads and nothing else (no MMA, no softmax, no
output but one number per program), on the benchmark's inputs (benchmarks/sparse_attention.py: Hq = 32,
D = 128, block 64, top-16, bf16), once with pointer loads (3 stages) and once with TMA boxes: its time is a
floor for any query-outer kernel at that shape. The KV-outer order has a traffic model (gathered rows from
DRAM, as its kernels run) and a strict floor (only its partials from DRAM) at the measured copy rate (`derive`).

For each (N, G) the script prints the floors next to the forward of the query-outer kernel and of the default
order, and the issue's targets with a verdict: under both designs' strict floors ("out of reach": no kernel of
either design meets it on this GPU), under the model floors only ("needs L2 gathers"), or above them.
`--from FILE.json` prints the table of a saved run.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json

import torch
import triton
import triton.language as tl

from benchmarks.sparse_attention import BS, D, HQ, TOPK, bench, make, memory_rate, time_dense, traffic_floor_gb
from sparsa.checkpoint import write_json
from sparsa.ops.sparse_attn.q_outer import row_descriptor

# (N, G): forward ms, forward+backward ms targets of issue 3 (3x the best anchor; at 64K the forward at 40% of the
# matmul rate, about 3.5 ms, which is below G = 4's 4 ms); None where the issue sets none. At 8K the forward
# target is dense SDPA's forward, timed in the same run.
TARGETS = {
    (16384, 4): (None, 7.6), (16384, 8): (None, 4.43), (16384, 16): (None, 2.73),
    (65536, 4): (3.5, 28.1), (65536, 8): (3.5, 19.4), (65536, 16): (3.5, 10.9),
}
HYBRID_DKDV_PAIR_BYTES = 2 * D * 2 + 8  # gathered Q and dO rows, lse and delta; no dQ partial


@triton.jit
def _gather_kernel(k_ptr, v_ptr, idx_ptr, out_ptr, n_tokens, HKV: tl.constexpr, TOPK_: tl.constexpr,
                   BLOCK: tl.constexpr, DIM: tl.constexpr, STAGES: tl.constexpr):
    """out[t, h] = sum of K and V over the rows of token t's selected blocks (KV head h); -1 slots skipped."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, DIM)
    acc = tl.zeros([BLOCK, DIM], tl.float32)
    for s in tl.range(0, TOPK_, num_stages=STAGES):
        blk = tl.load(idx_ptr + (t.to(tl.int64) * HKV + h) * TOPK_ + s)
        key = blk.to(tl.int64) * BLOCK + rows  # [BLOCK]
        mask = ((blk >= 0) & (key < n_tokens))[:, None]
        off = (key[:, None] * HKV + h) * DIM + cols[None, :]  # [BLOCK, DIM] into [N, HKV, DIM]
        acc += tl.load(k_ptr + off, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(v_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * HKV + h, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _gather_tma_kernel(k_desc, v_desc, idx_ptr, out_ptr, HKV: tl.constexpr, TOPK_: tl.constexpr,
                       BLOCK: tl.constexpr, DIM: tl.constexpr, STAGES: tl.constexpr):
    """As _gather_kernel with K and V loaded as [BLOCK, DIM] TMA boxes of [N, HKV * DIM] (a -1 slot loads block 0, weighted 0)."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    acc = tl.zeros([BLOCK, DIM], tl.float32)
    for s in tl.range(0, TOPK_, num_stages=STAGES):
        blk = tl.load(idx_ptr + (t.to(tl.int64) * HKV + h) * TOPK_ + s)
        row = (tl.maximum(blk, 0) * BLOCK).to(tl.int32)
        used = (blk >= 0).to(tl.float32)  # a -1 slot's load of block 0 is not counted
        acc += k_desc.load([row, (h * DIM).to(tl.int32)]).to(tl.float32) * used
        acc += v_desc.load([row, (h * DIM).to(tl.int32)]).to(tl.float32) * used
    tl.store(out_ptr + t * HKV + h, tl.sum(tl.sum(acc, axis=1), axis=0))


def gather_sums(k, v, idx, block_size, tma=False, stages=3):
    """[N, Hkv] fp32: per (token, KV head) the sum of its selected blocks' K and V (what the gather kernels read).
    k, v: [1, N, Hkv, D]; idx: [1, N, Hkv, topk] int32."""
    _, n, hkv, dim = k.shape
    topk = idx.shape[-1]
    idx = idx.contiguous()
    out = torch.full((n, hkv), float("nan"), device=k.device, dtype=torch.float32)
    if tma:
        kd, vd = (row_descriptor(x[0], block_size) for x in (k, v))  # the kernels' own [N, Hkv * D] boxes
        _gather_tma_kernel[(n, hkv)](kd, vd, idx, out, HKV=hkv, TOPK_=topk, BLOCK=block_size, DIM=dim,
                                    STAGES=stages, num_warps=4)
    else:
        _gather_kernel[(n, hkv)](k, v, idx, out, n, HKV=hkv, TOPK_=topk, BLOCK=block_size, DIM=dim, STAGES=stages,
                                 num_warps=4)
    return out


def reference_sums(k, v, idx, block_size, tokens):
    """[len(tokens), Hkv] fp32: gather_sums' values for the given tokens, in PyTorch."""
    _, n, hkv, dim = k.shape
    kv = (k[0].float() + v[0].float()).sum(-1)  # [N, Hkv]
    blk = idx[0, tokens].long()  # [T, Hkv, topk]
    keys = blk[..., None] * block_size + torch.arange(block_size, device=k.device)  # [T, Hkv, topk, block]
    ok = (blk[..., None] >= 0) & (keys < n)
    heads = torch.arange(hkv, device=k.device)[None, :, None, None].expand_as(keys)
    vals = kv[keys.clamp(0, n - 1), heads]
    return torch.where(ok, vals, torch.zeros_like(vals)).sum((-1, -2))


def check_gather(k, v, idx, block_size, tma, samples=256):
    """Raise if the gather kernel's sums differ from PyTorch's on `samples` random tokens (bf16 inputs, fp32 sums)."""
    tokens = torch.randint(0, k.shape[1], (samples,), device=k.device)
    got = gather_sums(k, v, idx, block_size, tma=tma)[tokens]
    want = reference_sums(k, v, idx, block_size, tokens)
    err = ((got - want).norm() / want.norm()).item()
    if not err < 1e-4:
        raise RuntimeError(f"gather kernel (tma={tma}) reads other data than counted: relative error {err:.2e}")


def gathered_bytes(idx, n_tokens, block_size, dim, esize):
    """Bytes of K and V the query-outer order brings on chip: valid slots x block rows x D x 2 tensors."""
    valid = (idx >= 0) & (idx.long() * block_size < n_tokens)
    return int(valid.sum()) * block_size * dim * 2 * esize


@functools.lru_cache(maxsize=None)
def dense_forward_ms(n):
    return time_dense(n)[0]


def measure(n, group):
    """The measured values of one (N, G): gather-only times, forwards, dense forward, KV-outer traffic (GB)."""
    import sparsa

    q, k, v, idx = make(n, group)
    tma = k.is_cuda and torch.cuda.get_device_capability()[0] >= 9  # TMA boxes: Hopper and later
    check_gather(k, v, idx, BS, tma=False)
    if tma:
        check_gather(k, v, idx, BS, tma=True)
    kv_fwd_gb, _, kv_bwd_gb = traffic_floor_gb(idx, n, group)
    return {
        "n": n, "g": group, "gather_gb": gathered_bytes(idx, n, BS, D, k.element_size()) / 1e9,
        "gather_ptr_ms": bench(lambda: gather_sums(k, v, idx, BS)),
        "gather_tma_ms": bench(lambda: gather_sums(k, v, idx, BS, tma=True)) if tma else None,
        "fwd_q_outer_ms": bench(lambda: sparsa.sparse_attention(q, k, v, idx, block_size=BS, loop_order="q_outer")),
        "fwd_default_ms": bench(lambda: sparsa.sparse_attention(q, k, v, idx, block_size=BS)),
        "fwd_dense_ms": dense_forward_ms(n), "kv_fwd_gb": kv_fwd_gb, "kv_bwd_gb": kv_bwd_gb,
    }


def derive(r, copy_gbs):
    """Floors and verdicts of a measured row (adds keys to r and returns it), all in ms:
    - query-outer: the gather-only time (its K / V loads, from L2 where they hit);
    - KV-outer model: 768 B per (pair, head) forward, 1032 backward, at the copy rate (gathered rows from DRAM;
      the measured kernels run near this); hybrid backward: 520 B plus a query-outer gather for dQ;
    - KV-outer strict: only the partials (bf16 O partial, dQ partial: 512 B written and read back per pair and head)
      from DRAM, every gathered row from L2 for free: no KV-outer kernel moves less on random selections, where a
      token's partials stay open while all its blocks are visited (far more than L2 holds).
    A target under both designs' strict floors is out of reach of either design on this GPU; one under the model
    floors only needs the gathered rows served from L2."""
    gather = min(ms for ms in (r["gather_ptr_ms"], r["gather_tma_ms"]) if ms is not None)
    pairs_heads = r["kv_bwd_gb"] * 1e9 / (4 * D * 2 + 8)
    kv_fwd = r["kv_fwd_gb"] / copy_gbs * 1e3
    kv_bwd = r["kv_bwd_gb"] / copy_gbs * 1e3
    strict = pairs_heads * 2 * D * 2 / 1e9 / copy_gbs * 1e3  # one partial row written and read back
    hybrid = pairs_heads * HYBRID_DKDV_PAIR_BYTES / 1e9 / copy_gbs * 1e3 + gather
    r.update(
        gather_tbs=r["gather_gb"] / gather, kv_fwd_floor_ms=kv_fwd, kv_bwd_floor_ms=kv_bwd, hybrid_bwd_floor_ms=hybrid,
        # backward strict: KV-outer's dQ partials, or the hybrid's query-outer dQ gather (its dK/dV rows from L2)
        strict_fwd_floor_ms=min(gather, strict), strict_fwd_bwd_floor_ms=2 * min(gather, strict),
        fwd_floor_ms=min(gather, kv_fwd), fwd_bwd_floor_ms=min(gather, kv_fwd) + min(kv_bwd, hybrid),
    )
    target_fwd, target_fb = TARGETS.get((r["n"], r["g"]), (r["fwd_dense_ms"] if r["n"] == 8192 else None, None))
    r.update(target_fwd_ms=target_fwd, target_fwd_bwd_ms=target_fb)
    for key in ("fwd", "fwd_bwd"):
        target = r[f"target_{key}_ms"]
        r[f"{key}_verdict"] = (None if target is None else "out of reach" if target < r[f"strict_{key}_floor_ms"]
                               else "needs L2 gathers" if target < r[f"{key}_floor_ms"] else "above the floors")
    return r


def format_row(r):
    def ms(x):
        return "-" if x is None else f"{x:.2f}"

    verdict = [f"{name} <= {r[f'target_{key}_ms']:.2f}: {r[f'{key}_verdict']}"
               for key, name in (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd")) if r[f"target_{key}_ms"] is not None]
    return (f"{r['n']:>6} {r['g']:>3} | {r['gather_gb']:6.2f} {r['gather_ptr_ms']:7.2f} {ms(r['gather_tma_ms']):>7} "
            f"{r['gather_tbs']:5.2f} | {r['fwd_q_outer_ms']:7.2f} {r['fwd_default_ms']:7.2f} {r['fwd_dense_ms']:5.2f} | "
            f"{r['kv_fwd_floor_ms']:6.2f} {r['kv_bwd_floor_ms']:6.2f} {r['hybrid_bwd_floor_ms']:6.2f} | "
            f"{ms(r['fwd_floor_ms'])} / {ms(r['fwd_bwd_floor_ms'])} | "
            f"{ms(r['strict_fwd_floor_ms'])} / {ms(r['strict_fwd_bwd_floor_ms'])} | {'; '.join(verdict)}")


HEADER = ("     N   G | gather GB  ptr ms  TMA ms  TB/s | q_outer default dense | KV fwd KV bwd hybrid | "
          "model floor fwd / fwd+bwd | strict floor fwd / fwd+bwd | targets")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ns", default="8192,16384,65536")
    p.add_argument("--gs", default="4,8,16")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    p.add_argument("--from", dest="saved", default=None, help="print the table of a saved --out JSON (no GPU)")
    args = p.parse_args()
    if args.saved:
        with open(args.saved) as f:
            saved = json.load(f)
        print(f"{saved['device']}; copy rate {saved['copy_gbs']:.0f} GB/s (from {args.saved})")
        print(HEADER)
        for r in saved["rows"]:
            for key in ("fwd", "bwd"):  # the first version (session 28's first run) saved ms, not GB
                r.setdefault(f"kv_{key}_gb", r.get(f"kv_{key}_floor_ms", 0.0) * saved["copy_gbs"] / 1e3)
            print(format_row(derive(r, saved["copy_gbs"])))
        return
    copy_gbs = memory_rate()
    print(f"{datetime.date.today()} {torch.cuda.get_device_name()} torch {torch.__version__} triton "
          f"{triton.__version__}; Hq = {HQ}, D = {D}, block {BS}, top-{TOPK}, bf16, random selections; "
          f"copy rate {copy_gbs:.0f} GB/s", flush=True)
    print(HEADER, flush=True)
    rows = []
    for n in (int(x) for x in args.ns.split(",")):
        for g in (int(x) for x in args.gs.split(",")):
            rows.append(derive(measure(n, g), copy_gbs))
            print(format_row(rows[-1]), flush=True)
            torch.cuda.empty_cache()
    if args.out:
        write_json(args.out, {"device": torch.cuda.get_device_name(), "copy_gbs": copy_gbs, "rows": rows}, indent=1)


if __name__ == "__main__":
    main()
