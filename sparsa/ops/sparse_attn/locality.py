"""How much adjacent tokens share their selected blocks, and when that makes the query-tile order the faster one.

The query-tile order (q_tile.py) runs each tile of TOKENS consecutive tokens over the union of their selected
blocks: its MMA work is the union size x TOKENS per (tile, KV head), against the selected slots that the other
orders compute. `selection_waste` is that ratio (1.0: the tokens of a tile select the same blocks; about TOKENS:
they share none) on a sample of the tiles. On the H100 (session 21, scripts/locality_bench.py,
benchmarks/results/h100_session21/tma_threshold.log; Hq = 32, head dim 128, block 64, top-16, K and V loaded by
TMA as by default on Hopper) the query-tile forward beat the best other order up to a waste (linear between the
measured pools) of about 2.55 / 2.69 at G = 1 (8K / 64K), 2.25 / 2.57 at G = 2, 2.36 / 2.62 at G = 4, 2.38 / 2.67
at G = 8 and 2.55 / 2.57 at G = 16, and lost above; `prefers_q_tile` takes it below `max_waste(G)`, about 95% of
the lower crossover (the sample's estimate was within 7% of the whole count; near the crossover either order
costs about the same), MAX_WASTE at group sizes not measured. Without TMA (other GPUs, padded head dims) the
crossovers were about 10% lower (benchmarks/results/h100_session21/locality_threshold_no_tma.log: 2.23 / 2.33 at
G = 1, 1.98 / 2.21 at G = 4, 2.12 / 2.21 at G = 16), hence NO_TMA_FACTOR. On GPUs with faster memory the
KV-outer order gains and the crossovers drop (H200, session 22: 0.79-0.86 of the H100's), so the caller scales the
threshold by device_tuning's `waste_factor`. Real
`select_blocks` selections of SmolLM2-135M at block 64 have a waste of about 1.3-1.5 on 16-token tiles at 4K
tokens and 1.4-1.7 at 8K, 1.5-1.8 / 1.7-2.2 on 64-token tiles (benchmarks/results/real_selection_locality_cpu*.md);
the benchmark's random selections about 3.7 (8K, G = 4) to 10 (64K, G = 4).

The check is on by default (SPARSA_LOCALITY_CHECK=0 turns it off). `LocalityMonitor` counts a sample of the tiles
on every CHECK_EVERY-th call of a shape, without host synchronisation; the choice follows the latest count that
has completed. H100, session 20 (benchmarks/results/h100_session20/locality_auto.log; Hq = 32, head dim 128,
block 64, top-16, bf16): one count takes 0.02-0.14 ms; on random selections the forward with the check ran as
without it (8K 1.13-1.41 ms, 64K 9.07-11.55), on pooled selections (P = 20, waste 1.4) it took q_tile, 8K 0.77-0.99
ms against 1.11-1.40 and 64K 6.04-7.96 against 9.15-11.42; forward+backward 5-13% faster. It is skipped under
torch.compile and during CUDA graph capture.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._env import env_choice
from .q_outer import _pow2

# the query-tile order is chosen below this waste (measured crossovers with TMA 2.25-2.69, see above), per
# group size where measured at both 8K and 64K; times NO_TMA_FACTOR where its forward loads K and V without TMA
MAX_WASTE = 2.1
MAX_WASTE_BY_GROUP = {1: 2.4, 2: 2.1, 4: 2.2, 8: 2.2, 16: 2.4}
NO_TMA_FACTOR = 0.88
# ... and this one (per group size) where the other order is the query-outer kernel with K / V by TMA (session 29,
# q_tile.q_outer_tma). H100: that kernel's forward (random selections) took 0.916 ms at 8K and 8.31 at 64K, G = 16;
# session 21's query-tile times on pooled selections at G = 16 (benchmarks/results/h100_session21/tma_threshold.log,
# waste 1.63-2.07: 0.755-0.942 ms at 8K; 1.70-2.27: 6.09-8.04 at 64K) cross those at a waste of about 2.01 (8K) and
# 2.35 (64K); 95% of the lower one
Q_OUTER_TMA_MAX_WASTE = {16: 1.9}
# sampled (tile, KV head) programs per check, at most, and slot compares per check (default_sample_programs)
SAMPLE_PROGRAMS = 2048
SAMPLE_COMPARES = 1 << 27
# a problem shape's selections are counted on every CHECK_EVERY-th call (LocalityMonitor)
CHECK_EVERY = 16
# shapes a monitor keeps (the oldest is dropped past this: prefill of many prompt lengths)
MAX_SHAPES = 64
# the check runs where the query-tile forward was measured: head dims up to 128, from 2048 tokens
MAX_HEAD_DIM = 128
# ... and blocks of up to 128 keys (measured at 64; compiled offline for sm_90 at 128: 96 bytes of spills at
# G = 4; at 256 two stages of K and V would need 256 KB of shared memory)
MAX_BLOCK_SIZE = 128
MIN_TOKENS = 2048
# devices on which the check runs (tests add "cpu" to run it in the interpreter)
DEVICES = ("cuda",)


@triton.jit
def _tile_distinct_kernel(IDX, BLOCKBASE, OUT, N, Hkv, STRIDE, TOPK: tl.constexpr, TOKENS: tl.constexpr,
                          BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):
    """OUT[0] += distinct selected global blocks of tile program_id(0) * STRIDE (TOKENS tokens, KV head
    program_id(1)); OUT[1] += its selected slots (-1 padding excluded). A slot is a repeat when an earlier slot
    of the tile holds the same block: compared CHUNK slots at a time, no sorting, no serial loop."""
    tile = tl.program_id(0).to(tl.int64) * STRIDE
    h = tl.program_id(1).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    gid = _slot_blocks(IDX, BLOCKBASE, tile, h, e, N, Hkv, TOPK, TOKENS)  # [E] global block or -1
    repeat = tl.zeros([BLOCK_E], dtype=tl.int32)
    for j0 in range(0, BLOCK_E, CHUNK):
        j = j0 + tl.arange(0, CHUNK)
        gj = _slot_blocks(IDX, BLOCKBASE, tile, h, j, N, Hkv, TOPK, TOKENS)  # [C]
        same = (gj[None, :] == gid[:, None]) & (j[None, :] < e[:, None]) & (gj[None, :] >= 0)
        repeat = tl.maximum(repeat, tl.max(same.to(tl.int32), 1))
    valid = gid >= 0
    tl.atomic_add(OUT, tl.sum((valid & (repeat == 0)).to(tl.int64), 0))
    tl.atomic_add(OUT + 1, tl.sum(valid.to(tl.int64), 0))


@triton.jit
def _slot_blocks(IDX, BLOCKBASE, tile, h, e, N, Hkv, TOPK: tl.constexpr, TOKENS: tl.constexpr):
    """Global block ids [E] of the tile's slots e (token e // TOPK of the tile, slot e % TOPK), -1 for padding
    and for slots past the tile or the sequence."""
    t = tile * TOKENS + e // TOPK
    ok = (e < TOKENS * TOPK) & (t < N)
    c = tl.load(IDX + (t * Hkv + h) * TOPK + e % TOPK, mask=ok, other=-1)
    base = tl.load(BLOCKBASE + t, mask=ok, other=0).to(tl.int32)  # global block ids fit int32
    return tl.where(ok & (c >= 0), base + c, -1)


def distinct_chunk(block_e: int) -> int:
    """Slots compared per step: [BLOCK_E, CHUNK] compares of about 4096 elements (offline sm_90 build: no spills)."""
    return max(1, min(block_e, 4096 // block_e))


def distinct_warps(block_e: int) -> int:
    return 8 if block_e >= 512 else 4


def _sample_stride(n_tiles: int, n_heads_kv: int, sample_programs: int) -> int:
    return max(1, triton.cdiv(n_tiles * n_heads_kv, sample_programs))


def default_sample_programs(tokens: int, topk: int) -> int:
    """Programs per check: about SAMPLE_COMPARES slot compares in all (BLOCK_E^2 per program), 64 to
    SAMPLE_PROGRAMS programs. Session 20's H100 times at 2048 programs: 0.04 ms at 64 slots per tile,
    0.17 ms at 256, 1.3 ms at 1024 (G = 1): the sample shrinks with the tile."""
    block_e = _pow2(tokens * topk, 16)
    return max(64, min(SAMPLE_PROGRAMS, SAMPLE_COMPARES // (block_e * block_e)))


def _launch_count(idx: torch.Tensor, meta, tokens: int, sample_programs: int) -> torch.Tensor:
    """Enqueue the count of the sampled tiles' distinct blocks and selected slots: int64 [2] on idx's device."""
    n_tokens, n_heads_kv, topk = idx.shape
    n_tiles = triton.cdiv(n_tokens, tokens)
    stride = _sample_stride(n_tiles, n_heads_kv, sample_programs)
    out = torch.zeros(2, dtype=torch.int64, device=idx.device)
    block_e = _pow2(tokens * topk, 16)
    _tile_distinct_kernel[(triton.cdiv(n_tiles, stride), n_heads_kv)](
        idx, meta.tok_blockbase, out, n_tokens, n_heads_kv, stride,
        TOPK=topk, TOKENS=tokens, BLOCK_E=block_e, CHUNK=distinct_chunk(block_e), num_warps=distinct_warps(block_e),
    )
    return out


def _waste(counts, tokens: int) -> float:
    distinct, useful = (int(c) for c in counts)
    return distinct * tokens / max(useful, 1)


def selection_waste(idx: torch.Tensor, meta, tokens: int, sample_programs: int = SAMPLE_PROGRAMS) -> float:
    """idx [N, Hkv, K] int32 (any slot order) -> (distinct blocks x tokens) / selected slots over every s-th
    tile of `tokens` tokens, s chosen so that at most `sample_programs` (tile, KV head) programs run. One host
    synchronisation (the automatic order uses `LocalityMonitor`, which has none)."""
    return _waste(_launch_count(idx, meta, tokens, sample_programs).tolist(), tokens)


class _Shape:
    """A monitor's state for one problem shape: calls seen, the probe in flight, the last measured waste."""

    def __init__(self):
        self.calls = 0
        self.pending = None  # (event, pinned host counts) of a probe not yet read
        self.waste = None


class LocalityMonitor:
    """The automatic order's view of the selections' locality, without host synchronisation.

    Every CHECK_EVERY-th call of a problem shape (tokens, KV heads, top-k, tile, blocks, device) enqueues the count on
    a sample of the tiles, copies it to pinned host memory behind a CUDA event and returns; a later call of
    that shape reads it once the event has completed (at most MAX_SHAPES shapes are kept). So the choice on CUDA lags the selections by at least
    one call and stands for every layer of that shape: a wrong choice costs speed, never correctness (every
    order computes the same attention). On the CPU (interpreter tests) the count is read at once.
    """

    def __init__(self):
        self._shapes: dict[tuple, _Shape] = {}

    def reset(self):
        self._shapes.clear()

    def waste(self, idx: torch.Tensor, meta, tokens: int) -> float | None:
        """The latest completed measurement of this shape's waste (None before the first), enqueuing a new
        probe every CHECK_EVERY calls."""
        key = (idx.device, *idx.shape, tokens, meta.n_blocks)  # n_blocks: block size and document layout
        state = self._shapes.get(key)
        if state is None:
            if len(self._shapes) >= MAX_SHAPES:
                del self._shapes[next(iter(self._shapes))]  # the shape seen first
            state = self._shapes[key] = _Shape()
        if state.pending is not None and state.pending[0].query():
            state.waste = _waste(state.pending[1].tolist(), tokens)
            state.pending = None
        if state.calls % CHECK_EVERY == 0 and state.pending is None:
            counts = _launch_count(idx, meta, tokens, default_sample_programs(tokens, idx.shape[-1]))
            if idx.is_cuda:
                host = torch.empty(2, dtype=torch.int64, pin_memory=True)
                host.copy_(counts, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(idx.device))  # the stream the copy was enqueued on
                state.pending = (event, host)
            else:
                state.waste = _waste(counts.tolist(), tokens)
        state.calls += 1
        return state.waste


MONITOR = LocalityMonitor()


def check_enabled() -> bool:
    """SPARSA_LOCALITY_CHECK=1|0 (default 1, see above): whether the automatic loop order looks at the selection."""
    return env_choice("SPARSA_LOCALITY_CHECK", ("0", "1"), "1") == "1"


def check_applies(q: torch.Tensor, head_dim: int, block_size: int) -> bool:
    """Whether the automatic loop order checks the selection's locality for q [N, Hq, D] (device, size, head
    dim, block size, not under torch.compile or CUDA graph capture, SPARSA_LOCALITY_CHECK)."""
    if q.device.type not in DEVICES or q.shape[0] < MIN_TOKENS or head_dim > MAX_HEAD_DIM:
        return False
    if block_size > MAX_BLOCK_SIZE:
        return False
    if torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return False  # no counts, events or host copies inside a traced or captured graph
    return check_enabled()


def max_waste(group: int, tma: bool = True, factor: float = 1.0, q_outer_tma: bool = False) -> float:
    """The waste below which the automatic order takes q_tile at G query heads per KV head, whose forward loads
    K and V by TMA or not (see above), times the device's `factor` (device_tuning.py: 0.85 on the H200);
    q_outer_tma: the order it replaces is the query-outer kernel with K / V by TMA (Q_OUTER_TMA_MAX_WASTE)."""
    if q_outer_tma and group in Q_OUTER_TMA_MAX_WASTE:
        return Q_OUTER_TMA_MAX_WASTE[group] * factor
    return MAX_WASTE_BY_GROUP.get(group, MAX_WASTE) * (1.0 if tma else NO_TMA_FACTOR) * factor


def prefers_q_tile(idx: torch.Tensor, meta, tokens: int, group: int, tma: bool = True, factor: float = 1.0,
                   q_outer_tma: bool = False) -> bool:
    """Whether the query-tile order's waste on this shape's selections idx [N, Hkv, K] (tiles of `tokens`
    tokens; MONITOR's latest measurement) is under max_waste(group, tma, factor, q_outer_tma). False until a
    measurement has completed."""
    waste = MONITOR.waste(idx, meta, tokens)
    return waste is not None and waste < max_waste(group, tma, factor, q_outer_tma)
