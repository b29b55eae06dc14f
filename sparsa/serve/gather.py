"""Host <-> device movement of KV blocks.

Layouts: host KV of one layer is [B, H, NB, bs, D] (one contiguous bs x D piece per block and
head), a slot pool is [B, H, S, bs, D], a load list is [B, H, S] int64 (host block to copy into
each slot, -1 = keep).

Three ways to gather the missing blocks host -> device, all with the same result:
  "kernel"  a persistent Triton kernel whose programs read pinned host memory directly (zero-copy
            through unified virtual addressing) and write the slots; the load list stays on the
            GPU, so no host synchronisation. Runs on whatever stream is current.
  "copies"  one cudaMemcpyAsync per block (needs the load list on the host: a synchronisation).
  "staged"  the host gathers the blocks into a pinned staging buffer, then one bulk copy (also
            needs the list on the host).
`benchmarks/decode.py` and `scripts/gpu_serve.py` measure the three; the engine uses "kernel" on
CUDA (it was the fastest, see benchmarks/results/decode_h100.md) and plain indexing on CPU.

New tokens are written through to host memory by `write_tokens` (a small kernel storing into
pinned memory on CUDA, plain indexing on CPU), so the host always holds the full cache.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None
    tl = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class HostPointer:
    """Hands a pinned host tensor to a Triton kernel as a device-visible pointer (UVA)."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.is_cuda:
            raise ValueError("HostPointer wraps host (pinned or registered) tensors")
        self.tensor = tensor
        self.dtype = tensor.dtype

    def data_ptr(self) -> int:
        return self.tensor.data_ptr()


def _kernel_arg(t: torch.Tensor):
    if t.is_cuda or interpreting():
        return t
    return HostPointer(t)


if triton is not None:

    @triton.jit
    def _gather_kernel(hk, hv, sk, sv, load_ptr, n_slots, host_bh, slot_bh,
                       n_tasks: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, NPROG: tl.constexpr):
        pid = tl.program_id(0)
        offs = tl.arange(0, CHUNK)
        for base in range(0, n_tasks, NPROG):
            task = base + pid
            blk = tl.load(load_ptr + task, mask=task < n_tasks, other=-1)
            if blk >= 0:
                bh = task // n_slots
                s = task - bh * n_slots
                src = bh.to(tl.int64) * host_bh + blk * E
                dst = bh.to(tl.int64) * slot_bh + s.to(tl.int64) * E
                for c in range(0, E, CHUNK):
                    tl.store(sk + dst + c + offs, tl.load(hk + src + c + offs))
                    tl.store(sv + dst + c + offs, tl.load(hv + src + c + offs))

    @triton.jit
    def _write_kernel(src_k, src_v, dst_k, dst_v, pos_ptr, host_bh,
                      H: tl.constexpr, D: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // H
        d = tl.arange(0, D)
        pos = tl.load(pos_ptr + b).to(tl.int64)
        dst = pid.to(tl.int64) * host_bh + pos * D
        tl.store(dst_k + dst + d, tl.load(src_k + pid * D + d))
        tl.store(dst_v + dst + d, tl.load(src_v + pid * D + d))


def default_ctas(batch: int) -> int:
    # H100, 16 KiB blocks: 16 programs 37 GB/s, 32 programs 48 GB/s, 64 or 132 no faster
    # (benchmarks/results/decode_h100.md); 32 leaves 100 SMs to the compute it overlaps
    return 32


def gather_blocks(host_k, host_v, slot_k, slot_v, load, *, method: str = "auto", n_ctas: int | None = None) -> None:
    """slot[b, h, s] <- host[b, h, load[b, h, s]] wherever load >= 0 (first B rows of the host arrays)."""
    batch, n_heads, n_slots = load.shape
    if method == "auto":
        method = "kernel" if slot_k.is_cuda else "index"
    if method == "index":
        mask = load >= 0
        b, h, s = mask.nonzero(as_tuple=True)
        blk = load[b, h, s]
        hb, hh, hblk = (x.to(host_k.device) for x in (b, h, blk))
        slot_k[b, h, s] = host_k[hb, hh, hblk].to(slot_k.device, non_blocking=True)
        slot_v[b, h, s] = host_v[hb, hh, hblk].to(slot_v.device, non_blocking=True)
        return
    if method == "kernel":
        if triton is None:
            raise ValueError("gather method 'kernel' needs triton")
        n_blocks, bs, dim = host_k.shape[2], host_k.shape[3], host_k.shape[4]
        elems = bs * dim
        chunk = min(elems, 2048)
        if elems % chunk:
            raise ValueError(f"block_size * head_dim ({elems}) must be a multiple of {chunk}")
        nprog = n_ctas or default_ctas(batch)
        _gather_kernel[(nprog,)](
            _kernel_arg(host_k), _kernel_arg(host_v), slot_k, slot_v, load.contiguous(),
            n_slots, n_blocks * elems, n_slots * elems,
            n_tasks=batch * n_heads * n_slots, E=elems, CHUNK=chunk, NPROG=nprog, num_warps=8,
        )
        return
    # the two DMA variants need the list on the host
    load_h = load.cpu()
    b, h, s = (load_h >= 0).nonzero(as_tuple=True)
    blk = load_h[b, h, s]
    if method == "copies":
        for bi, hi, si, ci in zip(b.tolist(), h.tolist(), s.tolist(), blk.tolist()):
            slot_k[bi, hi, si].copy_(host_k[bi, hi, ci], non_blocking=True)
            slot_v[bi, hi, si].copy_(host_v[bi, hi, ci], non_blocking=True)
        return
    if method == "staged":
        n = b.numel()
        if n == 0:
            return
        stage = torch.empty((2, n, *host_k.shape[3:]), dtype=host_k.dtype, pin_memory=True)
        torch.index_select(host_k.flatten(0, 2), 0, (b * n_heads + h) * host_k.shape[2] + blk, out=stage[0])
        torch.index_select(host_v.flatten(0, 2), 0, (b * n_heads + h) * host_k.shape[2] + blk, out=stage[1])
        dev = stage.to(slot_k.device, non_blocking=True)
        dst = ((b * n_heads + h) * n_slots + s).to(slot_k.device)
        slot_k.view(-1, *slot_k.shape[3:]).index_copy_(0, dst, dev[0])
        slot_v.view(-1, *slot_v.shape[3:]).index_copy_(0, dst, dev[1])
        return
    raise ValueError(f"method must be 'auto', 'kernel', 'index', 'copies' or 'staged', got {method!r}")


def write_tokens(host_k, host_v, k_new, v_new, pos, *, method: str = "auto") -> None:
    """host[b, h, pos[b] // bs, pos[b] % bs] <- new[b, h] for the first B rows. k_new, v_new [B, H, D]."""
    batch, n_heads, dim = k_new.shape
    if method == "auto":
        method = "kernel" if k_new.is_cuda else "index"
    if method == "index":
        bs = host_k.shape[3]
        rows = torch.arange(batch, device=pos.device)
        blk, off = torch.div(pos, bs, rounding_mode="floor"), pos % bs
        rows, blk, off = (x.to(host_k.device) for x in (rows, blk, off))
        host_k[rows, :, blk, off] = k_new.to(host_k.device)
        host_v[rows, :, blk, off] = v_new.to(host_v.device)
        return
    if method != "kernel":
        raise ValueError(f"method must be 'auto', 'kernel' or 'index', got {method!r}")
    n_blocks, bs = host_k.shape[2], host_k.shape[3]
    _write_kernel[(batch * n_heads,)](
        k_new.contiguous(), v_new.contiguous(), _kernel_arg(host_k), _kernel_arg(host_v), pos.contiguous(),
        n_blocks * bs * dim, H=n_heads, D=dim, num_warps=1,
    )
