"""The engine's KV cache, organised in blocks of `block_size` tokens.

Per layer l (B = batch capacity, H = KV heads, NB = ceil(max_len / bs) blocks, S = topk slots):

  resident layers (every layer in dense / sparse mode; layer 0 in offload / sparda):
      k, v       [B, H, NB, bs, D]  device
  offloaded layers (layers >= 1 in offload / sparda):
      host_k/v   [B, H, NB, bs, D]  pinned host memory (all layers in one allocation); every new
                                    token is written through, so the host holds the full cache
      slot_k/v   [B, H, S, bs, D]   device: the selected blocks (slot pool)
      block_map  [B, H, S] int64    device: host block held by each slot (-1 = empty)
      tail_k/v   [B, H, bs, D]      device: the newest (partial) block, never evicted
  every layer except in dense mode:
      kbar       [B, H, NB, D]      device: mean key of each complete block (block keys)

On a machine without a GPU, "device" and "host" are both CPU memory (no pinning).
`MemoryPlan` counts the bytes before anything is allocated and raises a ValueError when the
device or the host cannot hold them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    return 1 << 62


def device_available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return host_available_bytes()


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass
class MemoryPlan:
    device_cache: int
    device_workspace: int
    host_cache: int
    device_type: str

    @property
    def device_total(self) -> int:
        return self.device_cache + self.device_workspace

    def check(self, device: torch.device, host_limit: int | None = None, device_limit: int | None = None) -> None:
        dev_free = device_available_bytes(device) if device_limit is None else device_limit
        host_free = host_available_bytes() if host_limit is None else host_limit
        if self.device_type == "cpu":  # device and host are the same memory
            need = self.device_total + self.host_cache
            if need > min(dev_free, host_free):
                raise ValueError(f"not enough memory: the cache and workspace need {gib(need)}, "
                                 f"{gib(min(dev_free, host_free))} available (lower max_batch or max_len)")
            return
        if self.device_total > dev_free:
            raise ValueError(f"not enough device memory: cache {gib(self.device_cache)} + workspace "
                             f"{gib(self.device_workspace)} > {gib(dev_free)} free (lower max_batch or max_len)")
        if self.host_cache > host_free:
            raise ValueError(f"not enough host memory for the offloaded KV cache: {gib(self.host_cache)} > "
                             f"{gib(host_free)} available (lower max_batch or max_len)")


def allocate_host(shape, dtype, pin: bool):
    """Host buffer; with `pin`, page-locked at its exact size through cudaHostRegister (PyTorch's pinned
    allocator rounds every allocation up to a power of two), else through PyTorch's pinned allocator."""
    if not pin:
        return torch.zeros(shape, dtype=dtype), False
    t = torch.empty(shape, dtype=dtype)
    try:
        rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
        code = getattr(rc, "value", rc)
        if int(code) == 0:
            return t, True
    except Exception:  # pragma: no cover - depends on the CUDA build
        pass
    del t
    return torch.empty(shape, dtype=dtype, pin_memory=True), False


class BlockKVCache:
    """Allocates and holds the per-layer tensors described in the module docstring."""

    def __init__(self, *, n_layers: int, batch: int, n_heads: int, head_dim: int, max_len: int, block_size: int,
                 slots: int, offload_layers: list[bool], keep_kbar: bool, dtype: torch.dtype, device: torch.device):
        self.n_layers, self.batch, self.n_heads, self.head_dim = n_layers, batch, n_heads, head_dim
        self.block_size = block_size
        self.n_blocks = -(-max_len // block_size)
        self.max_len = max_len
        self.slots = slots
        self.offload = list(offload_layers)
        self.keep_kbar = keep_kbar
        self.dtype, self.device = dtype, device
        shape = (batch, n_heads, self.n_blocks, block_size, head_dim)
        n_off = sum(self.offload)
        self.host = None
        self._registered = False
        if n_off:
            self.host, self._registered = allocate_host((n_off, 2, *shape), dtype, pin=device.type == "cuda")
        self.k, self.v, self.host_k, self.host_v = [], [], [], []
        self.slot_k, self.slot_v, self.block_map, self.tail_k, self.tail_v, self.kbar = [], [], [], [], [], []
        j = 0
        for layer in range(n_layers):
            if self.offload[layer]:
                self.k.append(None)
                self.v.append(None)
                self.host_k.append(self.host[j, 0])
                self.host_v.append(self.host[j, 1])
                j += 1
                self.slot_k.append(torch.zeros((batch, n_heads, slots, block_size, head_dim), dtype=dtype, device=device))
                self.slot_v.append(torch.zeros_like(self.slot_k[-1]))
                self.block_map.append(torch.full((batch, n_heads, slots), -1, dtype=torch.long, device=device))
                self.tail_k.append(torch.zeros((batch, n_heads, block_size, head_dim), dtype=dtype, device=device))
                self.tail_v.append(torch.zeros_like(self.tail_k[-1]))
            else:
                self.k.append(torch.zeros(shape, dtype=dtype, device=device))
                self.v.append(torch.zeros(shape, dtype=dtype, device=device))
                for lst in (self.host_k, self.host_v, self.slot_k, self.slot_v, self.block_map, self.tail_k, self.tail_v):
                    lst.append(None)
            self.kbar.append(torch.zeros((batch, n_heads, self.n_blocks, head_dim), dtype=dtype, device=device)
                             if keep_kbar else None)

    @staticmethod
    def plan(*, n_layers: int, batch: int, n_heads: int, head_dim: int, max_len: int, block_size: int, slots: int,
             offload_layers: list[bool], keep_kbar: bool, dtype: torch.dtype, device: torch.device,
             workspace: int) -> MemoryPlan:
        es = torch.empty((), dtype=dtype).element_size()
        n_blocks = -(-max_len // block_size)
        full = 2 * batch * n_heads * n_blocks * block_size * head_dim * es
        n_off = sum(offload_layers)
        dev = (n_layers - n_off) * full
        dev += n_off * (2 * batch * n_heads * (slots + 1) * block_size * head_dim * es + batch * n_heads * slots * 8)
        if keep_kbar:
            dev += n_layers * batch * n_heads * n_blocks * head_dim * es
        return MemoryPlan(device_cache=dev, device_workspace=workspace, host_cache=n_off * full, device_type=device.type)

    def device_bytes_per_sequence(self) -> int:
        total = 0
        for lst in (self.k, self.v, self.slot_k, self.slot_v, self.block_map, self.tail_k, self.tail_v, self.kbar):
            total += sum(t.numel() * t.element_size() for t in lst if t is not None)
        return total // self.batch

    def host_bytes_per_sequence(self) -> int:
        return 0 if self.host is None else self.host.numel() * self.host.element_size() // self.batch

    def reset_rows(self, rows: int) -> None:
        """Forget the slot contents of the first `rows` sequences (a new batch starts)."""
        for bm in self.block_map:
            if bm is not None:
                bm[:rows].fill_(-1)

    def release(self) -> None:
        """Unpins and drops the host buffer (call before letting go of a cache on a GPU)."""
        if self.host is not None and self._registered:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaHostUnregister(self.host.data_ptr())
            self._registered = False
        self.host = None
        self.host_k = [None] * self.n_layers
        self.host_v = [None] * self.n_layers

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass
