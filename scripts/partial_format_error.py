"""What storing the KV-outer forward's partials in a narrower format would cost in accuracy (CPU, float64).

    PYTHONPATH=. python3 scripts/partial_format_error.py [--tokens 2048] [--group 4]

The KV-outer forward writes one partial per (token, selected block, query head): O_i = softmax-weighted values of
that block (normalised, D numbers) and its log-sum-exp; the merge combines a token's partials with weights
exp(lse_i - lse). This script computes those partials exactly (float64, the issue's random causal selections, block
64, top-16, D = 128), rounds O_i to a format, merges, rounds the output to the input dtype and reports the relative
error against the exact output, next to the error of a PyTorch reference in the input dtype (the bound of issue 3's
GPU check is twice that). Formats: bf16 / fp16 (what the kernels store), intN (per-row absmax scale in fp32, N-bit
integers), and only the final rounding. Inputs as scripts/gpu_sparse_attention.py: random, and large logits
(|q.k| ~ 50) in bf16 and fp16.
"""
from __future__ import annotations

import argparse

import torch

from sparsa.ops.sparse_attn import naive
from sparsa.ops.sparse_attn.index import random_selection

BLOCK, TOPK, DIM = 64, 16, 128


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def low_precision_reference(q, k, v, idx, scale, group):
    """Eager PyTorch in the input dtype (softmax in fp32, as scripts/gpu_sparse_attention.py's reference)."""
    allowed = naive.selection_token_mask(idx, q.shape[1], BLOCK).repeat_interleave(group, 1)
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(group, 1)
    vh = v.transpose(1, 2).repeat_interleave(group, 1)
    logits = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(logits.float(), -1).to(q.dtype), vh).transpose(1, 2)


def round_rows(o: torch.Tensor, fmt: str) -> torch.Tensor:
    """o [..., D] float64 stored in `fmt` and read back."""
    if fmt in ("bf16", "fp16"):
        return o.to(torch.bfloat16 if fmt == "bf16" else torch.float16).double()
    bits = int(fmt[3:])
    qmax = 2 ** (bits - 1) - 1
    step = (o.abs().amax(-1, keepdim=True).clamp_min(1e-30) / qmax).float().double()  # the row's fp32 scale
    return torch.round(o / step).clamp(-qmax, qmax) * step


def partials(q, k, v, idx, scale):
    """Exact per-(token, slot) partials of KV head 0: (O [N, G, K, D], lse [N, G, K]; empty slots weigh 0)."""
    n = q.shape[1]
    kb = k[0, :, 0].double().view(n // BLOCK, BLOCK, -1)
    vb = v[0, :, 0].double().view(n // BLOCK, BLOCK, -1)
    sel = idx[0, :, 0]
    blocks = sel.clamp_min(0)
    logits = torch.einsum("nhd,ntkd->nhtk", q[0].double(), kb[blocks]) * scale
    keys = blocks[:, :, None] * BLOCK + torch.arange(BLOCK)
    visible = (keys <= torch.arange(n)[:, None, None]) & (sel >= 0)[:, :, None]
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    m = logits.amax(-1, keepdim=True)
    p = torch.exp(logits - m)
    denom = p.sum(-1, keepdim=True)
    o = torch.nan_to_num(torch.einsum("nhtk,ntkd->nhtd", p, vb[blocks]) / denom)
    lse = torch.nan_to_num((m + denom.log()).squeeze(-1), nan=float("-inf"))
    return o, lse.float().double()  # lse is stored in fp32


def run(tokens: int, group: int, dtype: torch.dtype, logit: float | None, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, tokens, group, DIM, generator=gen)
    k = torch.randn(1, tokens, 1, DIM, generator=gen)
    v = torch.randn(1, tokens, 1, DIM, generator=gen)
    if logit is not None:  # as gpu_sparse_attention.inputs: logits up to about |q.k| ~ logit
        f = (logit / DIM**0.5) ** 0.5 * 1.5
        q, k = q * f, k * f
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    idx = random_selection(1, tokens, 1, TOPK, BLOCK, generator=torch.Generator().manual_seed(seed))
    scale = DIM**-0.5
    exact = naive.sparse_attention(q.double(), k.double(), v.double(), idx, block_size=BLOCK, scale=scale)
    exact = exact[0] if isinstance(exact, tuple) else exact
    out = {"pytorch_reference": rel(low_precision_reference(q, k, v, idx, scale, group), exact),
           "final_rounding_only": rel(exact.to(dtype), exact)}
    o, lse = partials(q, k, v, idx, scale)
    weights = torch.softmax(lse, -1)[..., None]
    for fmt in ("bf16", "fp16", "int8", "int10", "int12"):
        out[fmt] = rel((weights * round_rows(o, fmt)).sum(2).to(dtype)[None], exact)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--group", type=int, default=4)
    args = p.parse_args()
    if args.tokens % BLOCK or args.tokens < TOPK * BLOCK:
        raise ValueError(f"--tokens must be a multiple of {BLOCK} and at least {TOPK * BLOCK}, got {args.tokens}")
    print("| inputs | PyTorch reference | " + " | ".join(("bf16", "fp16", "int8", "int10", "int12")) + " | final rounding |")
    print("|---|---|---|---|---|---|---|---|")
    for name, dtype, logit in (("bf16 random", torch.bfloat16, None), ("bf16 logits ~ 50", torch.bfloat16, 50.0),
                               ("fp16 logits ~ 50", torch.float16, 50.0)):
        r = run(args.tokens, args.group, dtype, logit)
        cells = " | ".join(f"{r[f]:.2e}" for f in ("bf16", "fp16", "int8", "int10", "int12"))
        print(f"| {name} | {r['pytorch_reference']:.2e} | {cells} | {r['final_rounding_only']:.2e} |", flush=True)


if __name__ == "__main__":
    main()
