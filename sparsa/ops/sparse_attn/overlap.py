"""Overlap of the KV-outer per-token reductions with the next head chunk's block kernel (two CUDA streams).

The KV-outer forward is MAIN (per block: bound by its per-item instruction chain, 42-60% of DRAM bandwidth on
the H100) then the merge (per token: at 90% of DRAM bandwidth); the backward is dK/dV (per block, 39%) then the
dQ sum (per token, 89%). Run one after the other, their times add. With `SPARSA_KV_OVERLAP=1` a head slice is
cut into head chunks: the block kernel of chunk c + 1 runs on the caller's stream while the reduction of chunk c
runs on a high-priority side stream, so the block scheduler hands the reduction's programs the slots that the
block kernel's programs free and the two kernels share the SMs (bandwidth-bound next to latency-bound).

Correctness does not depend on it: every chunk is the same computation on a sub-range of the heads
(`PairIndex.head_range`, whose positions address the same per-pair buffers), the side stream waits for an
event recorded after its chunk's block kernel, and the caller's stream waits for the side stream before the
function returns (so the per-pair buffers, allocated on the caller's stream, are not freed under it). On CPU
(the interpreter) the same chunking runs without streams, which is how the tests cover it.

Measured on the H100 (session 15): slower at every shape and chunk count (8K: each chunk's five launches make the
call host-bound; 64K G = 4 forward 10.31-10.48 vs 10.21-10.31 ms), so it is off by default.
"""

from __future__ import annotations

import contextlib

import torch

from .._env import env_flag
from .index import PairIndex

# most head chunks per slice: more chunks overlap a larger share of the reductions (all but the last chunk's)
# at the cost of three index launches, one block kernel and one reduction per chunk
MAX_CHUNKS = 8


def enabled() -> bool:
    """SPARSA_KV_OVERLAP=0|1; unset: off (slower at every measured shape on the H100, session 15:
    benchmarks/results/h100_session15/kv_overlap_ab.log)."""
    return env_flag("SPARSA_KV_OVERLAP", False)


def head_chunks(index: PairIndex, on: bool) -> list[PairIndex]:
    """The slice `index` cut into at most MAX_CHUNKS chunks of whole heads (itself alone when `on` is False)."""
    if not on or index.n_heads == 1:
        return [index]
    n_chunks = min(MAX_CHUNKS, index.n_heads)
    step = -(-index.n_heads // n_chunks)
    return [index.head_range(a, min(a + step, index.n_heads)) for a in range(0, index.n_heads, step)]


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One high-priority stream per device (created once, reused)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        high = torch.cuda.Stream.priority_range()[1]  # (low, high): lower numbers are higher priorities
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index, priority=high)
    return _SIDE_STREAMS[index]


class Pipeline:
    """`with pipe.side(): launch(...)` runs the launches after everything enqueued so far on the caller's
    stream, on the side stream when streams are used; `pipe.join()` makes the caller's stream wait for them."""

    def __init__(self, device: torch.device, on: bool):
        self.streams = on and device.type == "cuda"
        if self.streams:
            self.main = torch.cuda.current_stream(device)
            self.stream = _side_stream(device)

    @contextlib.contextmanager
    def side(self):
        if not self.streams:
            yield
            return
        self.stream.wait_stream(self.main)
        with torch.cuda.stream(self.stream):
            yield

    def join(self) -> None:
        if self.streams:
            self.main.wait_stream(self.stream)
