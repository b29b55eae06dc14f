"""StreamKL attention KL: references vs finite differences, Triton kernels vs references.

Without a GPU the Triton kernels run in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so fp32/fp16 only there; bf16 and large shapes run in the GPU-only tests.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import sparsa
from sparsa.ops.kl import chunked, naive
from tests.helpers import rel_err

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
TRITON_OK = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="needs a GPU or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")


def make_inputs(
    batch,
    n_q,
    n_k,
    n_heads,
    heads_t,
    heads_s,
    dim_t,
    dim_s,
    dtype=torch.float32,
    device=DEVICE,
    gain=1.0,
    generator=None,
):
    def rnd(*shape):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * gain).to(device=device, dtype=dtype)

    return (
        rnd(batch, n_q, n_heads, dim_t),
        rnd(batch, n_k, heads_t, dim_t),
        rnd(batch, n_q, n_heads, dim_s),
        rnd(batch, n_k, heads_s, dim_s),
    )


def explicit_kl_rows(q_t, k_t, q_s, k_s, causal, scale_t, scale_s):
    """Independent per-row loop with F.kl_div (float64): [B, Tq, H]."""
    batch, n_q, n_heads, _ = q_t.shape
    n_k = k_t.shape[1]
    out = torch.zeros(batch, n_q, n_heads, dtype=torch.float64)
    for b in range(batch):
        for h in range(n_heads):
            kt = k_t[b, :, h // (n_heads // k_t.shape[2])].double()
            ks = k_s[b, :, h // (n_heads // k_s.shape[2])].double()
            for i in range(n_q):
                n_vis = min(n_k, i + n_k - n_q + 1) if causal else n_k
                if n_vis <= 0:
                    continue
                a = (kt[:n_vis] @ q_t[b, i, h].double()) * scale_t
                s = (ks[:n_vis] @ q_s[b, i, h].double()) * scale_s
                out[b, i, h] = F.kl_div(F.log_softmax(s, -1), F.log_softmax(a, -1), log_target=True, reduction="sum")
    return out


# ----------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal,n_q,n_k", [(True, 7, 7), (True, 9, 5), (True, 4, 9), (False, 5, 8)])
def test_reference_matches_explicit_loop(causal, n_q, n_k):
    g = torch.Generator().manual_seed(1)
    q_t, k_t, q_s, k_s = make_inputs(2, n_q, n_k, 4, 2, 1, 8, 4, torch.float64, "cpu", 1.5, g)
    rows = sparsa.attention_kl(q_t, k_t, q_s, k_s, causal=causal, scale_t=0.4, scale_s=0.6, reduction="none")
    ref = explicit_kl_rows(q_t, k_t, q_s, k_s, causal, 0.4, 0.6)
    assert rows.shape == (2, n_q, 4) and rows.dtype == torch.float64
    assert torch.allclose(rows, ref, atol=1e-12, rtol=1e-10)
    mean = sparsa.attention_kl(q_t, k_t, q_s, k_s, causal=causal, scale_t=0.4, scale_s=0.6)
    n_valid = 2 * 4 * (min(n_q, n_k) if causal else n_q)
    assert torch.allclose(mean, ref.sum() / n_valid)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_reference_gradcheck(direction):
    g = torch.Generator().manual_seed(2)
    inputs = [x.requires_grad_() for x in make_inputs(1, 5, 4, 2, 1, 2, 3, 2, torch.float64, "cpu", 1.0, g)]

    def fn(q_t, k_t, q_s, k_s):
        return sparsa.attention_kl(q_t, k_t, q_s, k_s, direction=direction, teacher_grad=True, reduction="none")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_reference_group_and_block_gradcheck():
    g = torch.Generator().manual_seed(3)
    q_t, k_t, _, k_s = make_inputs(1, 6, 6, 4, 2, 2, 3, 2, torch.float64, "cpu", 1.0, g)
    q_s = torch.randn(1, 6, 2, 2, dtype=torch.float64, generator=g)
    q_s.requires_grad_(), k_s.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: sparsa.group_attention_kl(q_t, k_t, a, b, reduction="none"), (q_s, k_s), eps=1e-6, atol=1e-6
    )
    kbar = torch.randn(1, 3, 2, 2, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda f, kb: sparsa.block_attention_kl(q_t, k_t, f, kb, block_size=2, reduction="none"),
        (q_s, kbar),
        eps=1e-6,
        atol=1e-6,
    )


def test_group_reference_definition():
    """G = 1 group KL equals the per-head attention KL; the group target is the mean of the softmaxes."""
    g = torch.Generator().manual_seed(4)
    q_t, k_t, q_s, k_s = make_inputs(2, 9, 9, 2, 2, 2, 8, 8, torch.float64, "cpu", 1.0, g)
    a = sparsa.group_attention_kl(q_t, k_t, q_s, k_s, reduction="none")
    b = sparsa.attention_kl(q_t, k_t, q_s, k_s, reduction="none")
    assert torch.allclose(a, b, atol=1e-12)
    q_t4 = torch.randn(2, 9, 4, 8, dtype=torch.float64, generator=g)
    rows = sparsa.group_attention_kl(q_t4, k_t, q_s, k_s, causal=False, reduction="none")
    probs = torch.softmax(torch.einsum("bthd,bjhd->bthj", q_t4, k_t.repeat_interleave(2, 2)) * 8**-0.5, -1)
    pbar = probs.view(2, 9, 2, 2, 9).mean(3)
    log_q = torch.log_softmax(torch.einsum("bthd,bjhd->bthj", q_s, k_s) * 8**-0.5, -1)
    assert torch.allclose(rows, (pbar * (pbar.log() - log_q)).sum(-1), atol=1e-12)


def test_block_reference_definition():
    g = torch.Generator().manual_seed(5)
    bs, T = 3, 11
    q_t, k_t, _, _ = make_inputs(1, T, T, 4, 2, 2, 8, 4, torch.float64, "cpu", 1.0, g)
    f_s = torch.randn(1, T, 2, 4, dtype=torch.float64, generator=g)
    kbar = torch.randn(1, T // bs, 2, 4, dtype=torch.float64, generator=g)
    rows = sparsa.block_attention_kl(q_t, k_t, f_s, kbar, block_size=bs, scale_t=0.5, scale_s=0.7, reduction="none")
    for t in range(T):
        n_vis = (t + 1) // bs
        for grp in range(2):
            if n_vis == 0:
                assert rows[0, t, grp] == 0
                continue
            mass = torch.zeros(n_vis, dtype=torch.float64)
            for h in (2 * grp, 2 * grp + 1):
                p = torch.softmax(k_t[0, : t + 1, grp] @ q_t[0, t, h] * 0.5, -1)
                mass += p[: n_vis * bs].view(n_vis, bs).sum(-1) / 2
            P = mass / mass.sum()
            log_q = torch.log_softmax(kbar[0, :n_vis, grp] @ f_s[0, t, grp] * 0.7, -1)
            assert torch.allclose(rows[0, t, grp], (P * (P.log() - log_q)).sum(), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_block_chunked_matches_reference(dtype):
    g = torch.Generator().manual_seed(6)
    bs = 4
    q_t, k_t, _, _ = make_inputs(2, 37, 37, 4, 2, 2, 16, 8, dtype, "cpu", 1.5, g)
    f_s = torch.randn(2, 37, 2, 8, dtype=torch.float64, generator=g).to(dtype)
    kbar = torch.randn(2, 37 // bs + 1, 2, 8, dtype=torch.float64, generator=g).to(dtype)
    f_s.requires_grad_(), kbar.requires_grad_()
    ref = naive.block_attention_kl(q_t, k_t, f_s, kbar, block_size=bs, scale_t=0.3, scale_s=0.5)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(ref.dtype)
    ref_grads = torch.autograd.grad((ref * grad).sum(), [f_s, kbar])
    out = chunked.block_attention_kl_chunked(
        q_t, k_t, f_s, kbar, block_size=bs, scale_t=0.3, scale_s=0.5, spans=[(0, 37)], chunk_size=5
    )
    grads = torch.autograd.grad((out * grad).sum(), [f_s, kbar])
    assert rel_err(out, ref) < 1e-5
    for x, r in zip(grads, ref_grads):
        assert rel_err(x, r) < 1e-5


def test_block_packed_documents_and_large_logits(triton_backend):
    """Chunked path (SPARSA_BACKEND=triton) vs reference on packed documents with |logits| ~ 50."""
    g = torch.Generator().manual_seed(7)
    bs = 4
    cu = torch.tensor([0, 10, 13, 30], dtype=torch.int32)
    q_t, k_t, _, _ = make_inputs(1, 30, 30, 4, 2, 2, 16, 8, torch.float32, "cpu", 1.0, g)
    f_s = torch.randn(1, 30, 2, 8, generator=g)
    q_t = q_t * 50 / q_t.norm(dim=-1, keepdim=True) * 4  # logits up to about 50
    kbar = sparsa.block_keys(torch.randn(1, 30, 2, 8, generator=g), bs, cu).requires_grad_()
    f_s.requires_grad_()
    out = sparsa.block_attention_kl(q_t, k_t, f_s, kbar, block_size=bs, cu_seqlens=cu, reduction="none", chunk_size=3)
    ref = naive.block_attention_kl(
        q_t.double(),
        k_t.double(),
        f_s.double(),
        kbar.double(),
        block_size=bs,
        scale_t=16**-0.5,
        scale_s=1.0,
        cu_seqlens=cu,
    )
    assert rel_err(out, ref) < 1e-4
    loss = sparsa.block_attention_kl(q_t, k_t, f_s, kbar, block_size=bs, cu_seqlens=cu, chunk_size=3)
    n_valid = 2 * sum(max(0, n - bs + 1) for n in (10, 3, 17))
    assert torch.allclose(loss.double(), ref.sum() / n_valid, rtol=1e-4)
    loss.backward()
    assert torch.isfinite(f_s.grad).all() and torch.isfinite(kbar.grad).all()


# ----------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU) vs the reference
# ----------------------------------------------------------------------------------------------
def _compare_attention_kl(
    inputs,
    *,
    causal,
    direction="forward",
    teacher_grad=True,
    cu_seqlens=None,
    scale_t=None,
    scale_s=None,
    val_tol=2e-5,
    grad_tol=2e-5,
    seed=0,
    floor=0.0,
):
    """attention_kl (Triton) vs the float64 reference: rows, LSEs and gradients by relative error. With
    `floor` > 0 the rows' error is relative to at least floor * sqrt(rows), the LSEs' to sqrt(rows) and a
    gradient's to floor * ||grad|| (a row over one key has KL = 0, zero gradients and an LSE equal to one logit)."""
    ins = [x.clone().requires_grad_() for x in inputs]
    kw = {
        "causal": causal,
        "direction": direction,
        "teacher_grad": teacher_grad,
        "scale_t": scale_t,
        "scale_s": scale_s,
    }
    out, lse_t, lse_s = sparsa.attention_kl(*ins, reduction="none", cu_seqlens=cu_seqlens, return_lse=True, **kw)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    out.backward(grad)
    refs = [x.detach().cpu().double().requires_grad_() for x in inputs]
    cu_cpu = None if cu_seqlens is None else cu_seqlens.cpu()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSA_BACKEND", "naive")
        ref, ref_lse_t, ref_lse_s = sparsa.attention_kl(
            *refs, reduction="none", cu_seqlens=cu_cpu, return_lse=True, **kw
        )
    ref.backward(grad.cpu().double())
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out, ref, floor * ref.numel() ** 0.5) < val_tol
    lse_floor = ref_lse_t.numel() ** 0.5 if floor else 0.0  # with a floor: errors of at least 1 nat per row
    assert rel_err(lse_t, ref_lse_t, lse_floor) < 1e-5 and rel_err(lse_s, ref_lse_s, lse_floor) < 1e-5
    n_grads = 4 if teacher_grad else 2
    for x, r in zip(ins[4 - n_grads :], refs[4 - n_grads :]):
        assert rel_err(x.grad, r.grad, floor * float(grad.double().norm())) < grad_tol
    if not teacher_grad:
        assert ins[0].grad is None and ins[1].grad is None
    return out, ref


@needs_triton
@pytest.mark.parametrize(
    "case",
    [
        # batch, n_q, n_k, heads, teacher kv heads, student kv heads, d_t, d_s, causal, dtype, direction, teacher_grad
        (1, 45, 45, 4, 2, 1, 32, 16, True, torch.float32, "forward", True),
        (1, 40, 23, 2, 2, 1, 24, 16, True, torch.float32, "reverse", True),  # N_Q > N_K: fully masked rows
        (1, 20, 50, 4, 1, 4, 16, 32, True, torch.float16, "forward", False),
        (2, 33, 40, 2, 1, 2, 16, 16, False, torch.float16, "reverse", False),
    ],
)
# grid orders of the kernels (triton_ops._tile_pids): the size rule (all heads together at these sizes),
# head by head, and groups of 3 heads (the last group smaller)
@pytest.mark.parametrize("head_group", ["", "1", "3"])
def test_triton_attention_kl_matches_reference(triton_backend, case, head_group, monkeypatch):
    monkeypatch.setenv("SPARSA_KL_HEAD_GROUP", head_group)
    batch, n_q, n_k, heads, h_t, h_s, d_t, d_s, causal, dtype, direction, teacher_grad = case
    g = torch.Generator().manual_seed(10)
    inputs = make_inputs(batch, n_q, n_k, heads, h_t, h_s, d_t, d_s, dtype, DEVICE, 1.0, g)
    tol = 2e-5 if dtype == torch.float32 else 5e-3
    out, _ = _compare_attention_kl(
        inputs,
        causal=causal,
        direction=direction,
        teacher_grad=teacher_grad,
        scale_t=0.3 if causal else None,
        val_tol=tol if dtype == torch.float32 else 1e-4,
        grad_tol=tol,
    )
    if causal and n_q > n_k:
        assert (out[:, : n_q - n_k] == 0).all()  # fully masked rows contribute exactly 0


@needs_triton
def test_triton_identical_teacher_student_gives_zero(triton_backend):
    g = torch.Generator().manual_seed(11)
    q, k, _, _ = make_inputs(1, 40, 40, 2, 1, 1, 32, 32, torch.float32, DEVICE, 2.0, g)
    q_s, k_s = q.clone().requires_grad_(), k.clone().requires_grad_()
    rows = sparsa.attention_kl(q, k, q_s, k_s, reduction="none")
    assert rows.abs().max() < 1e-5
    rows.sum().backward()
    assert q_s.grad.abs().max() < 1e-5 and k_s.grad.abs().max() < 1e-5
    q_group = q[:, :, :1].expand(-1, -1, 2, -1)  # two identical teacher heads: their mean is the same softmax
    rows_g = sparsa.group_attention_kl(q_group, k, q[:, :, :1], k, reduction="none")
    assert rows_g.abs().max() < 1e-5


@needs_triton
def test_triton_large_logits(triton_backend):
    """|logits| up to about 50 (peaked distributions, exp underflow on most keys)."""
    g = torch.Generator().manual_seed(12)
    q_t, k_t, q_s, k_s = make_inputs(1, 48, 48, 2, 1, 1, 16, 16, torch.float32, DEVICE, 1.0, g)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)
    q_t, k_t, q_s, k_s = unit(q_t) * 50, unit(k_t), unit(q_s) * 40, unit(k_s)  # logits in [-50, 50]
    _out, ref = _compare_attention_kl(
        (q_t, k_t, q_s, k_s), causal=True, scale_t=1.0, scale_s=1.0, val_tol=1e-4, grad_tol=1e-4
    )
    assert ref.abs().max() > 1.0  # the test really has large KLs


@needs_triton
def test_triton_packed_documents_equal_separate_runs(triton_backend):
    g = torch.Generator().manual_seed(13)
    lengths = [17, 5, 26]
    cu = torch.tensor([0, 17, 22, 48], dtype=torch.int32, device=DEVICE)
    inputs = make_inputs(1, 48, 48, 2, 1, 2, 16, 16, torch.float32, DEVICE, 1.0, g)
    out, _ = _compare_attention_kl(inputs, causal=True, cu_seqlens=cu)
    start = 0
    for n in lengths:
        part = sparsa.attention_kl(*(x[:, start : start + n] for x in inputs), reduction="none")
        assert torch.allclose(out[:, start : start + n], part, atol=1e-6)
        start += n
    mean = sparsa.attention_kl(*inputs, cu_seqlens=cu)
    assert torch.allclose(mean, out.sum() / (48 * 2), atol=1e-7)


@needs_triton
@pytest.mark.parametrize(
    "case",
    [  # batch, n_q, n_k, hq, hkv, d_t, d_s, causal, dtype, packed
        (1, 40, 40, 4, 2, 32, 16, True, torch.float32, False),
        (1, 30, 45, 3, 1, 16, 32, False, torch.float16, False),
        (1, 44, 44, 4, 2, 16, 16, True, torch.float32, True),
    ],
)
def test_triton_group_attention_kl_matches_reference(triton_backend, case):
    batch, n_q, n_k, hq, hkv, d_t, d_s, causal, dtype, packed = case
    g = torch.Generator().manual_seed(14)
    q_t, k_t, _, _ = make_inputs(batch, n_q, n_k, hq, hkv, 1, d_t, 16, dtype, DEVICE, 1.0, g)
    _, _, q_s, k_s = make_inputs(batch, n_q, n_k, hkv, hkv, hkv, 16, d_s, dtype, DEVICE, 1.0, g)
    cu = torch.tensor([0, 19, 44], dtype=torch.int32, device=DEVICE) if packed else None
    q_s.requires_grad_(), k_s.requires_grad_()
    out, lse_s = sparsa.group_attention_kl(
        q_t, k_t, q_s, k_s, causal=causal, reduction="none", cu_seqlens=cu, return_lse=True
    )
    grad = torch.randn(out.shape, generator=g).to(out.device)
    out.backward(grad)
    refs = [x.detach().cpu().double() for x in (q_t, k_t, q_s, k_s)]
    refs[2].requires_grad_(), refs[3].requires_grad_()
    ref, ref_lse = naive.group_attention_kl(
        *refs, causal=causal, scale_t=d_t**-0.5, scale_s=d_s**-0.5, cu_seqlens=None if cu is None else cu.cpu()
    )
    ref.backward(grad.cpu().double())
    tol = 2e-5 if dtype == torch.float32 else 5e-3
    assert rel_err(out, ref) < (tol if dtype == torch.float32 else 1e-4)
    assert rel_err(lse_s, ref_lse) < 1e-5
    assert rel_err(q_s.grad, refs[2].grad) < tol and rel_err(k_s.grad, refs[3].grad) < tol


@needs_triton
@pytest.mark.parametrize("op", ["attention", "attention_reverse_teacher_grad", "group"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n_q", [30, 37])  # 37 > N_K = 30: 7 fully masked rows, the mean excludes them
def test_triton_scalar_reductions_and_stride0_grad(triton_backend, op, reduction, n_q):
    """The reductions inside the autograd functions: value, and gradients of a scaled loss (the upstream
    gradient reaches the kernels as a stride-0 view of a 0-d tensor, the 1/n of the mean as a factor)."""
    g = torch.Generator().manual_seed(15)
    inputs = make_inputs(2, n_q, 30, 4, 2, 2 if op == "group" else 1, 16, 8, torch.float32, DEVICE, 1.5, g)
    if op == "group":  # one student head per KV group
        inputs = (*inputs[:2], inputs[2][:, :, :2].contiguous(), inputs[3])

    def run(tensors):
        if op == "group":
            return sparsa.group_attention_kl(*tensors, reduction=reduction)
        if op == "attention":
            return sparsa.attention_kl(*tensors, reduction=reduction)
        return sparsa.attention_kl(*tensors, reduction=reduction, direction="reverse", teacher_grad=True)

    trained = [0, 1, 2, 3] if op.endswith("teacher_grad") else [2, 3]
    ours = [x.clone().requires_grad_(i in trained) for i, x in enumerate(inputs)]
    loss = run(ours)
    (loss * -3.25).backward()
    ref_in = [x.cpu().double().requires_grad_(i in trained) for i, x in enumerate(inputs)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSA_BACKEND", "naive")
        ref = run(ref_in)
    (ref * -3.25).backward()
    assert loss.dim() == 0
    assert abs(loss.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))
    for i in trained:
        assert rel_err(ours[i].grad, ref_in[i].grad) < 2e-5, i


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def test_bad_inputs_raise_value_error():
    q, k = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16)
    qs, ks = torch.randn(1, 8, 4, 8), torch.randn(1, 8, 1, 8)
    cases = [
        (lambda: sparsa.attention_kl(q[0], k, qs, ks), "q_t"),
        (lambda: sparsa.attention_kl(q, k, qs[:, :, :2], ks), "q_s heads"),
        (lambda: sparsa.attention_kl(q, torch.randn(1, 8, 3, 16), qs, ks), "k_t heads"),
        (lambda: sparsa.attention_kl(q, k, qs, torch.randn(1, 8, 1, 4)), "k_s head dim"),
        (lambda: sparsa.attention_kl(q, k, qs, ks[:, :5]), "k_s length"),
        (lambda: sparsa.attention_kl(q, k.half(), qs, ks), "k_t dtype"),
        (lambda: sparsa.attention_kl(q, k, qs, ks, direction="sideways"), "direction"),
        (lambda: sparsa.attention_kl(q, k, qs, ks, reduction="max"), "reduction"),
        (lambda: sparsa.attention_kl(q, k, qs, ks, scale_t=-1.0), "scale_t"),
        (lambda: sparsa.attention_kl(q, k, qs, ks, causal=1), "causal"),
        (
            lambda: sparsa.attention_kl(q, k, qs, ks, cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)),
            "cu_seqlens",
        ),
        (lambda: sparsa.attention_kl(q.long(), k, qs, ks), "q_t"),
        (lambda: sparsa.group_attention_kl(q, k, qs, ks), "q_s heads"),
        (lambda: sparsa.block_attention_kl(q, k, qs[:, :, :2], torch.randn(1, 2, 2, 8), block_size=0), "block_size"),
        (lambda: sparsa.block_attention_kl(q, k, qs[:, :, :2], torch.randn(1, 1, 2, 8), block_size=4), "kbar_s"),
        (lambda: sparsa.block_attention_kl(q, k, qs[:, :, :1], torch.randn(1, 2, 2, 8), block_size=4), "f_s"),
        (lambda: sparsa.block_attention_kl(q, k, qs[:, :, :2], torch.randn(1, 2, 2, 4), block_size=4), "kbar_s"),
    ]
    for fn, needle in cases:
        with pytest.raises(ValueError, match=needle):
            fn()


# ----------------------------------------------------------------------------------------------
# GPU only: bf16, realistic head dims, determinism, long sequences
# ----------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_attention_kl_realistic(dtype):
    g = torch.Generator().manual_seed(20)
    inputs = make_inputs(2, 1000, 1000, 8, 2, 4, 128, 64, dtype, "cuda", 1.0, g)
    _compare_attention_kl(inputs, causal=True, teacher_grad=True, val_tol=1e-3, grad_tol=2e-2)


@needs_cuda
def test_gpu_deterministic_backward():
    g = torch.Generator().manual_seed(21)
    inputs = make_inputs(1, 2048, 2048, 8, 2, 2, 128, 128, torch.bfloat16, "cuda", 1.0, g)
    results = []
    for _ in range(2):
        q_s, k_s = inputs[2].clone().requires_grad_(), inputs[3].clone().requires_grad_()
        sparsa.attention_kl(inputs[0], inputs[1], q_s, k_s).backward()
        results.append((q_s.grad, k_s.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@needs_cuda
def test_gpu_group_and_block_bf16():
    g = torch.Generator().manual_seed(22)
    q_t, k_t, _, _ = make_inputs(1, 700, 700, 8, 2, 1, 128, 16, torch.bfloat16, "cuda", 1.0, g)
    _, _, q_s, k_s = make_inputs(1, 700, 700, 2, 2, 2, 16, 64, torch.bfloat16, "cuda", 1.0, g)
    q_s.requires_grad_(), k_s.requires_grad_()
    out = sparsa.group_attention_kl(q_t, k_t, q_s, k_s, reduction="none")
    out.sum().backward()
    refs = [x.detach().cpu().double() for x in (q_t, k_t, q_s, k_s)]
    refs[2].requires_grad_(), refs[3].requires_grad_()
    ref, _ = naive.group_attention_kl(*refs, causal=True, scale_t=128**-0.5, scale_s=64**-0.5)
    ref.sum().backward()
    assert rel_err(out, ref) < 1e-3
    assert rel_err(q_s.grad, refs[2].grad) < 2e-2 and rel_err(k_s.grad, refs[3].grad) < 2e-2
    kbar = sparsa.block_keys(k_s.detach(), 64).requires_grad_()
    f = q_s.detach().clone().requires_grad_()
    blk = sparsa.block_attention_kl(q_t, k_t, f, kbar, block_size=64, reduction="none")
    blk.sum().backward()
    f_ref, kb_ref = f.detach().cpu().double().requires_grad_(), kbar.detach().cpu().double().requires_grad_()
    blk_ref = naive.block_attention_kl(refs[0], refs[1], f_ref, kb_ref, block_size=64, scale_t=128**-0.5, scale_s=1.0)
    blk_ref.sum().backward()
    assert rel_err(blk, blk_ref) < 1e-3
    assert rel_err(f.grad, f_ref.grad) < 1e-2 and rel_err(kbar.grad, kb_ref.grad) < 1e-2


@needs_cuda
def test_gpu_launch_cache_repeats_and_new_shapes():
    """Second and later launches go through sparsa.ops._launch's cache: same shapes twice, then a
    batch of 2 with the strides of the batch-1 call (only the grid differs), then inputs whose pointer
    is not 16-byte aligned (a new specialisation); every result is checked against the reference."""
    g = torch.Generator().manual_seed(23)
    for batch in (1, 1, 2, 2):
        inputs = make_inputs(batch, 300, 300, 4, 2, 2, 64, 64, torch.float16, "cuda", 1.0, g)
        _compare_attention_kl(inputs, causal=True, teacher_grad=False, val_tol=1e-3, grad_tol=2e-2)
    for _ in range(2):
        q_t, k_t, q_s, k_s = make_inputs(1, 300, 300, 4, 2, 2, 64, 64, torch.float16, "cuda", 1.0, g)
        shifted = torch.empty(q_s.numel() + 1, dtype=q_s.dtype, device="cuda")[1:].view_as(q_s)
        shifted.copy_(q_s)
        assert shifted.data_ptr() % 16 != 0
        out = sparsa.attention_kl(q_t, k_t, shifted, k_s, reduction="none")
        ref, _, _ = naive.attention_kl(*(x.cpu().double() for x in (q_t, k_t, q_s, k_s)), causal=True,
                                       scale_t=64**-0.5, scale_s=64**-0.5, direction="forward")
        assert rel_err(out, ref) < 1e-3
    from sparsa.ops import _launch

    entries = [e for launcher in _launch._LAUNCHERS.values() for e in launcher._cache.values()]
    assert {"fwd", "dq", "dk"} <= set(_launch._LAUNCHERS) and entries
    assert all(e[3] is not None for e in entries)  # cached launches call the C launcher directly


def test_head_group_rule(monkeypatch):
    """Grid head groups (triton_ops._head_group): K tiles of a group within HEAD_GROUP_L2_BYTES, equal-size
    groups, at least 1 and at most all heads; SPARSA_KL_HEAD_GROUP forces a (clamped) value."""
    pytest.importorskip("triton")
    from sparsa.ops.kl import triton_ops

    monkeypatch.delenv("SPARSA_KL_HEAD_GROUP", raising=False)
    bf16_d128 = 2 * 128 * 2  # both sides' K bytes per key
    got = {n: triton_ops._head_group(n, bf16_d128, 32) for n in (1024, 2048, 4096, 8192, 16384, 32768, 1 << 20)}
    assert got == {1024: 32, 2048: 16, 4096: 11, 8192: 6, 16384: 3, 32768: 1, 1 << 20: 1}
    for n_bh in range(1, 70):
        for n_keys in (100, 3000, 9000):
            g = triton_ops._head_group(n_keys, bf16_d128, n_bh)
            assert 1 <= g <= n_bh
            assert g * n_keys * bf16_d128 <= triton_ops.HEAD_GROUP_L2_BYTES or g == 1
    monkeypatch.setenv("SPARSA_KL_HEAD_GROUP", "100")
    assert triton_ops._head_group(4096, bf16_d128, 8) == 8


def test_launch_arithmetic_helpers_match_triton():
    triton = pytest.importorskip("triton")
    from sparsa.ops._intmath import cdiv, next_pow2
    from sparsa.ops.kl import triton_ops

    for n in range(0, 3000):
        assert next_pow2(n) == triton.next_power_of_2(max(n, 1))
        for b in (1, 16, 64, 128):
            assert cdiv(n, b) == triton.cdiv(n, b)
    assert triton_ops._tune_key(100_000) == 1 << 14 and triton_ops._pad_dim(40) == 64
