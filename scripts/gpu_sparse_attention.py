"""GPU correctness check of the Triton selected-block attention (needs one CUDA GPU).

    PYTHONPATH=. python scripts/gpu_sparse_attention.py [--quick] [--out results.json]

For every case: bf16/fp16 inputs, outputs and gradients of both loop orders against an fp32
reference on the same (rounded) inputs; the error must stay within 2x that of a bf16 PyTorch
reference (the same math run by PyTorch in bf16: bf16 matmuls, bf16 probabilities). Outputs are
allocated full of NaN (poisoned). Also: logits |q.k| ~ 50 in fp16 and bf16, adversarial
selections (every token the same block, only block 0, maximal -1 padding), selections from
sparsa.select_blocks, packed documents, and a 128K-token sequence (64-bit offsets) checked on
sampled rows against an fp64 per-row reference.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback

import torch

import sparsa
from sparsa.checkpoint import write_json
from sparsa.ops.sparse_attn import backward as bwd_mod
from sparsa.ops.sparse_attn import kv_outer as kv_mod
from sparsa.ops.sparse_attn import naive
from sparsa.ops import _alloc as alloc_mod
from sparsa.ops.sparse_attn.index import random_selection

ORDERS = ("q_outer", "kv_outer", "q_tile")  # q_tile: the default only for small problems or local selections; checked on all
RESULTS = []
FAILURES = []


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def lowp_reference(q, k, v, idx, block_size, scale, cu_seqlens=None):
    """PyTorch in the input dtype: low-precision logits and probabilities (what eager bf16 code does)."""

    def one(q, k, v, idx):
        allowed = naive.selection_token_mask(idx, q.shape[1], block_size)
        group = q.shape[2] // k.shape[2]
        qh = q.transpose(1, 2)
        kh = k.transpose(1, 2).repeat_interleave(group, 1)
        vh = v.transpose(1, 2).repeat_interleave(group, 1)
        logits = torch.matmul(qh, kh.transpose(-1, -2)) * scale
        logits = logits.masked_fill(~allowed.repeat_interleave(group, 1), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.matmul(probs, vh).transpose(1, 2)

    if cu_seqlens is None:
        return one(q, k, v, idx)
    spans = list(zip(cu_seqlens.tolist()[:-1], cu_seqlens.tolist()[1:]))
    return torch.cat([one(q[:, s:e], k[:, s:e], v[:, s:e], idx[:, s:e]) for s, e in spans], 1)


def with_grads(fn, q, k, v, do, backward=True):
    q, k, v = (x.detach().clone().requires_grad_(backward) for x in (q, k, v))
    out = fn(q, k, v)
    o, lse = out if isinstance(out, tuple) else (out, None)
    if not backward:
        return [o.detach(), lse, None, None, None]
    o.backward(do)
    return [o.detach(), lse, q.grad, k.grad, v.grad]


def case(*args, **kwargs):
    try:
        _case(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - keep going: report every case
        traceback.print_exc()
        row = {"case": args[0], "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        RESULTS.append(row)
        FAILURES.append(row)
        torch.cuda.empty_cache()


def _case(name, q, k, v, idx, block_size, cu_seqlens=None, grads=True, partials=None):
    """Compares both loop orders with the fp32 reference and the low-precision PyTorch reference."""
    torch.cuda.synchronize()
    t0 = time.time()
    scale = q.shape[-1] ** -0.5
    do = torch.randn(*q.shape[:3], v.shape[-1], device=q.device, dtype=q.dtype)
    f32 = with_grads(
        lambda a, b, c: naive.sparse_attention(a, b, c, idx, block_size=block_size, scale=scale, cu_seqlens=cu_seqlens),
        *(x.float() for x in (q, k, v, do)),
        backward=grads,
    )
    low = with_grads(lambda a, b, c: lowp_reference(a, b, c, idx, block_size, scale, cu_seqlens), q, k, v, do, grads)
    names = ["o", "dq", "dk", "dv"] if grads else ["o"]
    ref_pos = {"o": 0, "dq": 2, "dk": 3, "dv": 4}
    base = {n: rel(low[ref_pos[n]], f32[ref_pos[n]]) for n in names}
    for order in ORDERS:
        got = with_grads(
            lambda a, b, c, order=order: sparsa.sparse_attention(
                a, b, c, idx, block_size=block_size, cu_seqlens=cu_seqlens, return_lse=True, loop_order=order
            ),
            q,
            k,
            v,
            do,
            grads,
        )
        row = {
            "case": name,
            "order": order,
            "dtype": str(q.dtype).replace("torch.", ""),
            "shape": list(q.shape),
            "partials": partials or "default",
        }
        ok = True
        for n in names:
            t = got[ref_pos[n]]
            nan = bool(torch.isnan(t).any())
            err = rel(t, f32[ref_pos[n]])
            row[n] = err
            row[n + "_lowp_ref"] = base[n]
            if nan or not math.isfinite(err) or err > 2 * base[n] + 1e-6:
                ok = False
        fin = torch.isfinite(f32[1])
        lse_ok = torch.equal(fin, torch.isfinite(got[1])) and not torch.isnan(got[1]).any()
        row["lse_abs"] = (got[1][fin] - f32[1][fin]).abs().max().item() if fin.any() else 0.0
        ok = ok and lse_ok and row["lse_abs"] < 0.05
        row["ok"] = ok
        RESULTS.append(row)
        if not ok:
            FAILURES.append(row)
        errs = " ".join(f"{n}={row[n]:.2e}(ref {base[n]:.2e})" for n in names)
        print(f"{'PASS' if ok else 'FAIL'} {name:34s} {order:8s} {errs} lse_abs={row['lse_abs']:.1e}", flush=True)
    del f32, low
    torch.cuda.empty_cache()
    print(f"    ({time.time() - t0:.1f} s)", flush=True)


def inputs(seqlen, hkv, group, dim, dtype, logit=None, seed=0, batch=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, seqlen, hkv * group, dim, device="cuda", generator=g)
    k = torch.randn(batch, seqlen, hkv, dim, device="cuda", generator=g)
    v = torch.randn(batch, seqlen, hkv, dim, device="cuda", generator=g)
    if logit is not None:
        f = (logit / dim**0.5) ** 0.5 * 1.5
        q, k = q * f, k * f
    return q.to(dtype), k.to(dtype), v.to(dtype)


def sel(seqlen, hkv, topk, bs, seed, cu=None, batch=1):
    return random_selection(
        batch, seqlen, hkv, topk, bs, cu_seqlens=cu, generator=torch.Generator().manual_seed(seed), device="cuda"
    )


def sampled_rows_check(seqlen=131072, hkv=8, group=4, dim=128, bs=64, topk=16, n_rows=24):
    """Long sequence: every loop order vs an fp64 per-row reference on sampled tokens (64-bit offsets)."""
    q, k, v = inputs(seqlen, hkv, group, dim, torch.bfloat16, seed=99)
    idx = sel(seqlen, hkv, topk, bs, 99)
    rows = torch.cat(
        [torch.tensor([0, 1, 63, 64, 4097]), torch.randint(0, seqlen, (n_rows - 6,)), torch.tensor([seqlen - 1])]
    )
    for order in ORDERS:
        o, lse = sparsa.sparse_attention(q, k, v, idx, block_size=bs, return_lse=True, loop_order=order)
        errs = []
        for t in rows.tolist():
            for h in range(hkv):
                blocks = [b for b in idx[0, t, h].tolist() if b >= 0]
                keys = torch.cat([torch.arange(b * bs, min((b + 1) * bs, t + 1)) for b in blocks]).cuda()
                qq = q[0, t, h * group : (h + 1) * group].double()
                kk, vv = k[0, keys, h].double(), v[0, keys, h].double()
                lg = qq @ kk.T * dim**-0.5
                ref = torch.softmax(lg, -1) @ vv
                errs.append(rel(o[0, t, h * group : (h + 1) * group], ref))
                errs.append(abs(lse[0, t, h * group].item() - torch.logsumexp(lg[0], 0).item()))
        worst_o, worst_lse = max(errs[0::2]), max(errs[1::2])
        ok = worst_o < 1e-2 and worst_lse < 1e-2 and not torch.isnan(o).any()
        row = {
            "case": f"sampled rows N={seqlen} G={group}",
            "order": order,
            "o": worst_o,
            "lse_abs": worst_lse,
            "ok": ok,
        }
        RESULTS.append(row)
        if not ok:
            FAILURES.append(row)
        print(
            f"{'PASS' if ok else 'FAIL'} sampled rows N={seqlen} G={group} {order}: worst row rel err {worst_o:.2e}, lse abs {worst_lse:.2e}",
            flush=True,
        )
        del o, lse
    # the two loop orders must agree everywhere
    o1 = sparsa.sparse_attention(q, k, v, idx, block_size=bs, loop_order="q_outer")
    o2 = sparsa.sparse_attention(q, k, v, idx, block_size=bs, loop_order="kv_outer")
    d = rel(o2, o1)
    print(f"{'PASS' if d < 1e-2 else 'FAIL'} q_outer vs kv_outer at N={seqlen}: rel diff {d:.2e}", flush=True)
    RESULTS.append({"case": f"orders agree N={seqlen}", "o": d, "ok": d < 1e-2})
    # backward at this length: finite and deterministic
    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    do = torch.randn_like(q)
    grads = []
    for _ in range(2):
        qr.grad = kr.grad = vr.grad = None
        sparsa.sparse_attention(qr, kr, vr, idx, block_size=bs, loop_order="kv_outer").backward(do)
        grads.append([x.grad.clone() for x in (qr, kr, vr)])
    det = all(torch.equal(a, b) for a, b in zip(*grads))
    fin = all(torch.isfinite(g).all().item() for g in grads[0])
    print(f"{'PASS' if det and fin else 'FAIL'} backward at N={seqlen}: deterministic={det} finite={fin}", flush=True)
    RESULTS.append({"case": f"backward N={seqlen} deterministic+finite", "ok": det and fin})
    if not (det and fin):
        FAILURES.append(RESULTS[-1])


def real_activation_cases(path):
    """bf16 checks on a real model's queries and keys (SmolLM2-135M: G = 3, head dim 64) with the SSA selection
    of select_blocks at block 64 / top-16 and block 16 / top-16 (block 0 and two local blocks forced); values
    random. File from scripts/real_activations.py."""
    from scripts.real_activations import load_qk

    for layer, (q, k) in load_qk(path).items():
        q, k = q.cuda().to(torch.bfloat16)[None], k.cuda().to(torch.bfloat16)[None]
        v = torch.randn(k.shape, device="cuda", dtype=torch.bfloat16)
        for bsz in (64, 16):
            idx = sparsa.select_blocks(q, k, block_size=bsz, topk=16, init_blocks=1, local_blocks=2)
            case(f"SmolLM2 layer {layer} T={q.shape[1]} select_blocks block {bsz} top-16", q, k, v, idx, bsz)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--activations",
        default=None,
        help="q/k of a real model (scripts/real_activations.py --out FILE): checks on their select_blocks selections",
    )
    args = ap.parse_args()
    alloc_mod.POISON_OUTPUTS = True
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    T, D, bs, K = 4096, 128, 64, 16
    groups = [1, 2, 3, 4, 5, 6, 8, 16] if not args.quick else [1, 3, 4, 16]
    for group in groups:
        hkv = max(1, 16 // group)
        q, k, v = inputs(T, hkv, group, D, torch.bfloat16, seed=group)
        case(f"random bf16 G={group} Hkv={hkv}", q, k, v, sel(T, hkv, K, bs, group), bs)
    # partial-buffer precision options
    q, k, v = inputs(T, 4, 4, D, torch.bfloat16, seed=41)
    idx = sel(T, 4, K, bs, 41)
    kv_mod.PARTIAL_DTYPE, bwd_mod.DQ_PARTIAL_DTYPE = torch.bfloat16, torch.bfloat16
    case("random bf16 G=4 bf16 partials", q, k, v, idx, bs, partials="bf16")
    kv_mod.PARTIAL_DTYPE, bwd_mod.DQ_PARTIAL_DTYPE = None, torch.float32
    # large logits
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = inputs(T, 4, 4, D, dtype, logit=50.0, seed=7)
        lg = (q[0, :256, 0].float() @ k[0, :256, 0].float().T * D**-0.5).abs().max().item()
        case(f"large logits (max {lg:.0f}) {str(dtype)[6:]}", q, k, v, sel(T, 4, K, bs, 7), bs)
    # adversarial selections
    hkv, group = 4, 4
    q, k, v = inputs(T, hkv, group, D, torch.bfloat16, seed=8)
    cur = torch.arange(T, device="cuda") // bs
    same = torch.full((1, T, hkv, K), -1, dtype=torch.int32, device="cuda")
    same[0, :, :, 0] = torch.where(cur >= 5, 5, cur).int()[:, None]
    same[0, :, :, 1] = torch.where(cur > 5, cur, -1).int()[:, None]
    case("every token selects block 5", q, k, v, same, bs)
    only0 = torch.full((1, T, hkv, K), -1, dtype=torch.int32, device="cuda")
    only0[..., 0] = 0
    case("only block 0 (maximal -1 padding)", q, k, v, only0, bs)
    own = torch.full((1, T, hkv, K), -1, dtype=torch.int32, device="cuda")
    own[..., 0] = cur.int()[:, None]
    case("only the own block", q, k, v, own, bs)
    # realistic selection from sparsa.select_blocks (SSA rule) on structured activations
    try:
        base = torch.randn(1, T, 1, D, device="cuda")
        qa = (0.7 * base + 0.7 * torch.randn(1, T, hkv * group, D, device="cuda")).to(torch.bfloat16)
        ka = (0.7 * base + 0.7 * torch.randn(1, T, hkv, D, device="cuda")).to(torch.bfloat16)
        sidx = sparsa.select_blocks(qa, ka, block_size=bs, topk=K, init_blocks=1, local_blocks=2)
        case("select_blocks (SSA) selection", qa, ka, v, sidx, bs)
    except Exception as exc:  # noqa: BLE001 - report, do not hide
        print(f"SKIP select_blocks selection: {type(exc).__name__}: {exc}", flush=True)
    if args.activations:
        real_activation_cases(args.activations)
    # packed documents, block sizes, head dims
    cu = torch.tensor([0, 1000, 3100, 3200, T], dtype=torch.int32, device="cuda")
    q, k, v = inputs(T, 4, 3, D, torch.bfloat16, seed=9)
    case("packed docs G=3", q, k, v, sel(T, 4, K, bs, 9, cu=cu.cpu()), bs, cu_seqlens=cu)
    if not args.quick:
        for bsz, topk in ((16, 64), (32, 32), (128, 8)):
            q, k, v = inputs(2048, 4, 4, D, torch.bfloat16, seed=bsz)
            case(f"block {bsz} topk {topk}", q, k, v, sel(2048, 4, topk, bsz, bsz), bsz)
        q, k, v = inputs(2048, 4, 2, 64, torch.bfloat16, seed=64)
        case("head dim 64 G=2", q, k, v, sel(2048, 4, K, bs, 64), bs)
        q, k, v = inputs(2048, 2, 4, 256, torch.bfloat16, seed=256)
        case("head dim 256 G=4 (fwd)", q, k, v, sel(2048, 2, K, bs, 256), bs, grads=False)
        q, k, v = inputs(1024, 2, 4, D, torch.bfloat16, seed=5, batch=2)
        case("batch 2 G=4", q, k, v, sel(1024, 2, K, bs, 5, batch=2), bs)
    try:
        sampled_rows_check()
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        FAILURES.append({"case": "sampled rows", "ok": False, "error": str(exc)})
        RESULTS.append(FAILURES[-1])
    n_ok = sum(1 for r in RESULTS if r.get("ok"))
    print(f"\nSUMMARY: {n_ok}/{len(RESULTS)} checks passed; {len(FAILURES)} failed", flush=True)
    for r in FAILURES:
        print("  FAILED:", r)
    if args.out:
        write_json(args.out, RESULTS, indent=1)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
