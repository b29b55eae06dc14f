"""StreamKL benchmark: fused attention KL vs the materialising naive version and SDPA attention.

Shape (issue 5): batch 1, H = 32 heads, head dim 128 (teacher and student), causal, bf16,
N in {2K, 4K, 8K, 16K, 32K, 64K, 128K}. Forward = the loss (reduction "mean"); forward+backward =
loss.backward() with a frozen teacher (gradients for q_s and k_s). SDPA = ordinary causal attention
of the same shape ([1, 32, N, 128] q, k, v; fwd+bwd with gradients for q, k, v). "naive" = eager
PyTorch that materialises both distributions in fp32 (what existing distillation code does); it is
run only while it fits in memory. Peak extra memory = peak allocated during the call minus what was
allocated before (inputs) minus the gradients the call returns. Times: triton.testing.do_bench medians.

Usage: python benchmarks/attention_kl.py [--sizes 2048,4096] [--out DIR] [--no-naive] [--extras] [--forward-only]
Writes DIR/attention_kl.json and DIR/attention_kl.md and prints the table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sparsa  # noqa: E402
from benchmarks.timing import median_ms  # noqa: E402
from sparsa.checkpoint import write_json, write_text  # noqa: E402

H, D = 32, 128
NAIVE_MAX = 8192
GiB = 1 << 30


def naive_attention_kl(q_t, k_t, q_s, k_s, scale):
    """Materialising baseline: both [B, H, N, N] fp32 distributions, log_softmax x2 + kl_div."""
    n = q_t.shape[1]
    mask = torch.ones(n, n, dtype=torch.bool, device=q_t.device).triu(1)
    a = torch.matmul(q_t.transpose(1, 2), k_t.transpose(1, 2).transpose(-1, -2)).float() * scale
    b = torch.matmul(q_s.transpose(1, 2), k_s.transpose(1, 2).transpose(-1, -2)).float() * scale
    a = a.masked_fill(mask, -1e9)
    b = b.masked_fill(mask, -1e9)
    log_p = torch.log_softmax(a, dim=-1)
    log_q = torch.log_softmax(b, dim=-1)
    rows = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # [B, H, N]
    return rows.mean()


def bench(fn, grad_to_none=None):
    """Median ms of fn over a do_bench window of max(100 ms, about 7 calls) (benchmarks/timing.py)."""
    return median_ms(fn, warmup=25, rep=100, grad_to_none=grad_to_none)


def peak_extra(fn, returned_bytes=0):
    """Peak bytes allocated during fn beyond what was allocated before, minus returned gradients."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base - returned_bytes


def rel(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def time_sdpa(q, k, v):
    """SDPA attention of the same shape: [1, H, N, D] q, k, v; fwd+bwd with gradients for all three."""
    qh, kh, vh = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    with torch.no_grad():
        fwd = bench(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True))
    fwd_bwd = bench(
        lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).sum().backward(), grad_to_none=[qh, kh, vh]
    )
    return {"sdpa_fwd_ms": fwd, "sdpa_fwdbwd_ms": fwd_bwd}


def time_both_forwards(kl_fwd, x):
    """Forward times with the Triton and the Gluon kernel (SPARSA_KL_GLUON=0 / 1) where both can run."""
    from sparsa.ops.kl import gluon_fwd

    before = os.environ.get("SPARSA_KL_GLUON")
    os.environ["SPARSA_KL_GLUON"] = "1"
    try:
        if not gluon_fwd.eligible(x, x, x, x, None, False):
            return {}
        times = {}
        with torch.no_grad():
            for flag, name in (("0", "kl_fwd_triton_ms"), ("1", "kl_fwd_gluon_ms")):
                os.environ["SPARSA_KL_GLUON"] = flag
                times[name] = bench(kl_fwd)
        return times
    finally:
        if before is None:
            os.environ.pop("SPARSA_KL_GLUON")
        else:
            os.environ["SPARSA_KL_GLUON"] = before


def run_forward_only(n, results):
    """Forward only (--forward-only): StreamKL with each kernel that can run, and SDPA."""
    gen = torch.Generator(device="cuda").manual_seed(n)
    q_t, k_t, q_s, k_s = (torch.randn(1, n, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
                          for _ in range(4))

    def kl_fwd():
        return sparsa.attention_kl(q_t, k_t, q_s, k_s)

    with torch.no_grad():
        row = {"N": n, "kl_fwd_ms": bench(kl_fwd)}
        qh, kh = q_t.transpose(1, 2).contiguous(), k_t.transpose(1, 2).contiguous()
        row["sdpa_fwd_ms"] = bench(lambda: F.scaled_dot_product_attention(qh, kh, kh, is_causal=True))
    row.update(time_both_forwards(kl_fwd, q_t))
    results.append(row)
    print(json.dumps(row), flush=True)


def run_size(n, with_naive, results):
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(n)
    mk = lambda: torch.randn(1, n, H, D, device=dev, dtype=torch.bfloat16, generator=gen)
    q_t, k_t, q_s, k_s = mk(), mk(), mk(), mk()
    q_s.requires_grad_(), k_s.requires_grad_()
    row = {"N": n}
    grad_bytes = 2 * q_s.numel() * q_s.element_size()

    def kl_fwd():
        return sparsa.attention_kl(q_t, k_t, q_s, k_s)

    def kl_fwd_bwd():
        sparsa.attention_kl(q_t, k_t, q_s, k_s).backward()

    with torch.no_grad():
        row["kl_fwd_ms"] = bench(kl_fwd)
        row["kl_fwd_extra_bytes"] = peak_extra(kl_fwd)
    row["kl_fwdbwd_ms"] = bench(kl_fwd_bwd, grad_to_none=[q_s, k_s])
    q_s.grad = k_s.grad = None
    row["kl_fwdbwd_extra_bytes"] = peak_extra(kl_fwd_bwd, grad_bytes)
    row["kl_extra_bytes_per_row_head"] = row["kl_fwdbwd_extra_bytes"] / (n * H)
    q_s.grad = k_s.grad = None

    row.update(time_sdpa(q_t, k_t, q_s))
    row.update(time_both_forwards(kl_fwd, q_t))

    if with_naive and n <= NAIVE_MAX:
        scale = D**-0.5
        try:
            with torch.no_grad():
                row["naive_fwd_ms"] = bench(lambda: naive_attention_kl(q_t, k_t, q_s, k_s, scale))
            row["naive_fwdbwd_ms"] = bench(
                lambda: naive_attention_kl(q_t, k_t, q_s, k_s, scale).backward(), grad_to_none=[q_s, k_s]
            )
            q_s.grad = k_s.grad = None
            row["naive_fwdbwd_extra_bytes"] = peak_extra(
                lambda: naive_attention_kl(q_t, k_t, q_s, k_s, scale).backward(), grad_bytes
            )
            q_s.grad = k_s.grad = None
            # correctness of the fused kernel against the baseline on the same inputs
            ref = naive_attention_kl(q_t, k_t, q_s, k_s, scale)
            ref.backward()
            ref_grads = (q_s.grad.clone(), k_s.grad.clone())
            q_s.grad = k_s.grad = None
            out = sparsa.attention_kl(q_t, k_t, q_s, k_s)
            out.backward()
            row["check_loss_rel_err"] = abs(out.item() - ref.item()) / abs(ref.item())
            row["check_dq_rel_err"] = rel(q_s.grad, ref_grads[0])
            row["check_dk_rel_err"] = rel(k_s.grad, ref_grads[1])
            row["loss"] = out.item()
            q_s.grad = k_s.grad = None
        except torch.cuda.OutOfMemoryError:
            row["naive_fwd_ms"] = "OOM"
        torch.cuda.empty_cache()
    elif with_naive:
        row["naive_fwd_ms"] = "not run (O(N^2) memory)"
    results.append(row)
    print(json.dumps(row), flush=True)


def extras_for(n, results):
    """Group KL (G = 4) and block KL (chunked) timings at one size; not part of the targets."""
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(7 + n)

    def rnd(*shape):
        return torch.randn(*shape, device=dev, dtype=torch.bfloat16, generator=gen)

    q_t, k_t = rnd(1, n, 32, 128), rnd(1, n, 8, 128)
    q_s, k_s = rnd(1, n, 8, 128).requires_grad_(), rnd(1, n, 8, 128).requires_grad_()
    row = {"op": "group_attention_kl", "N": n, "Hq": 32, "Hkv": 8}
    with torch.no_grad():
        row["fwd_ms"] = bench(lambda: sparsa.group_attention_kl(q_t, k_t, q_s, k_s))
    row["fwdbwd_ms"] = bench(lambda: sparsa.group_attention_kl(q_t, k_t, q_s, k_s).backward(), [q_s, k_s])
    results.append(row)
    print(json.dumps(row), flush=True)
    kbar = sparsa.block_keys(k_s.detach(), 64).requires_grad_()
    f = q_s.detach().clone().requires_grad_()
    row = {"op": "block_attention_kl (chunked PyTorch)", "N": n, "Hq": 32, "Hkv": 8, "block": 64}
    t0 = time.time()
    sparsa.block_attention_kl(q_t, k_t, f, kbar, block_size=64).backward()
    torch.cuda.synchronize()
    row["fwdbwd_first_call_s"] = time.time() - t0
    f.grad = kbar.grad = None
    row["fwdbwd_extra_bytes"] = peak_extra(
        lambda: sparsa.block_attention_kl(q_t, k_t, f, kbar, block_size=64).backward(),
        f.numel() * 2 + kbar.numel() * 2,
    )
    results.append(row)
    print(json.dumps(row), flush=True)


def run_extras(results):
    for n in (8192, 32768):
        extras_for(n, results)


def fmt(x, digits=3):
    if isinstance(x, str):
        return x
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if x < 100 else f"{x:.0f}"


def table(rows):
    head = (
        "| N | StreamKL fwd ms | fwd+bwd ms | extra B/(row,head) | SDPA fwd ms | SDPA fwd+bwd ms | fwd / SDPA "
        "| fwd+bwd / SDPA | naive fwd ms | naive fwd+bwd ms | naive extra GiB | naive fwd / StreamKL fwd |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        if "kl_fwdbwd_ms" not in r:  # errors, and --forward-only rows (in the table below)
            continue
        nf = r.get("naive_fwd_ms")
        speed = nf / r["kl_fwd_ms"] if isinstance(nf, float) else None
        nx = r.get("naive_fwdbwd_extra_bytes")
        lines.append(
            f"| {r['N'] // 1024}K | {fmt(r['kl_fwd_ms'])} | {fmt(r['kl_fwdbwd_ms'])} | "
            f"{fmt(r['kl_extra_bytes_per_row_head'])} | {fmt(r['sdpa_fwd_ms'])} | {fmt(r['sdpa_fwdbwd_ms'])} | "
            f"{r['kl_fwd_ms'] / r['sdpa_fwd_ms']:.2f}x | {r['kl_fwdbwd_ms'] / r['sdpa_fwdbwd_ms']:.2f}x | "
            f"{fmt(nf) if nf is not None else '-'} | {fmt(r.get('naive_fwdbwd_ms'))} | "
            f"{fmt(nx / GiB) if nx is not None else '-'} | {f'{speed:.0f}x' if speed else '-'} |"
        )
    for r in rows:
        if "kl_fwd_ms" in r and "kl_fwdbwd_ms" not in r:
            lines.append(f"| {r['N'] // 1024}K | {fmt(r['kl_fwd_ms'])} | - | - | {fmt(r['sdpa_fwd_ms'])} | - | "
                         f"{r['kl_fwd_ms'] / r['sdpa_fwd_ms']:.2f}x | - | - | - | - | - |")
    if any("kl_fwd_gluon_ms" in r for r in rows):
        lines += ["", "Forward by kernel (same run; the table above uses the one selected by SPARSA_KL_GLUON):", "",
                  "| N | Triton fwd ms | Gluon fwd ms | Triton / SDPA | Gluon / SDPA |", "|---|---|---|---|---|"]
        for r in rows:
            if "kl_fwd_gluon_ms" in r:
                t, g, sd = r["kl_fwd_triton_ms"], r["kl_fwd_gluon_ms"], r["sdpa_fwd_ms"]
                lines.append(f"| {r['N'] // 1024}K | {fmt(t)} | {fmt(g)} | {t / sd:.2f}x | {g / sd:.2f}x |")
    return "\n".join(lines)


def forward_kernel() -> str:
    """Which StreamKL forward kernel runs at the benchmark's shape on this GPU."""
    from sparsa.ops.kl import gluon_fwd

    x = torch.empty(1, gluon_fwd.GLUON_MIN_KEYS, H, D, device="cuda", dtype=torch.bfloat16)
    if not gluon_fwd.eligible(x, x, x, x, None, False):
        return f"triton (autotuned); SPARSA_KL_GLUON mode {gluon_fwd.mode()}"
    return (f"gluon from {gluon_fwd.GLUON_MIN_KEYS} keys (SPARSA_KL_GLUON mode {gluon_fwd.mode()}), config "
            f"{gluon_fwd._config(None, gluon_fwd.GLUON_MIN_KEYS)} below {gluon_fwd.SHORT_KEYS} keys, "
            f"{gluon_fwd._config(None, gluon_fwd.SHORT_KEYS)} from there")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2048,4096,8192,16384,32768,65536,131072")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--no-naive", action="store_true")
    parser.add_argument("--extras", action="store_true", help="also time group and block KL")
    parser.add_argument("--forward-only", action="store_true",
                        help="only the forward (StreamKL with each kernel that can run, SDPA): the quick comparison")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention_kl.py needs a CUDA GPU")
    import triton

    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "shape": f"B=1, H={H}, D={D}, causal, bf16, reduction=mean, teacher frozen",
        "forward_kernel": forward_kernel(),
    }
    results, extras = [], []
    for n in (int(s) for s in args.sizes.split(",")):
        try:
            if args.forward_only:
                run_forward_only(n, results)
            else:
                run_size(n, not args.no_naive, results)
        except Exception as exc:  # noqa: BLE001 - keep going: report what failed
            results.append({"N": n, "error": repr(exc)[:300]})
            print(json.dumps(results[-1]), flush=True)
        torch.cuda.empty_cache()
    if args.extras:
        try:
            run_extras(extras)
        except Exception as exc:  # noqa: BLE001 - extras are optional
            extras.append({"error": repr(exc)[:300]})
    try:
        from sparsa.ops.kl import triton_ops

        meta["autotuned"] = {
            k: {str(key): str(cfg) for key, cfg in getattr(v, "cache", {}).items()}
            for k, v in triton_ops._TUNED.items()
        }
    except Exception as exc:  # noqa: BLE001 - metadata only
        print(f"could not read the autotuner caches: {exc!r}")
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "attention_kl.json"), {"meta": meta, "results": results, "extras": extras},
               indent=1)
    text = "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n" + table(results) + "\n"
    if extras:
        text += "\nExtras:\n" + "\n".join("- " + json.dumps(e) for e in extras) + "\n"
    write_text(os.path.join(args.out, "attention_kl.md"), text)
    print(text)


if __name__ == "__main__":
    main()
