"""The sparsa inference engine: chunked prefill, static-shape decode, four cache modes, one API.

Modes
  dense    full KV on the device, full attention
  sparse   full KV on the device, selection with the current query (SSA rule, `sparsa.select_blocks`)
  offload  KV of layers >= 1 in pinned host memory; select with the current query, copy the missing
           blocks into the layer's slot pool, then attend (the "sparse + offload" baseline)
  sparda   as offload, but layer l+1's selection comes from layer l's forecast, computed during
           layer l; the slot diff keeps resident blocks and the missing ones are copied on a side
           stream while layer l computes; layer l+1 waits on an event right before its attention.

Decode never synchronises with the host: positions, selections, slot maps, counters and the
finished flags stay on the device; every step has the same shapes (the cache is preallocated for
`max_len`, selections have `topk` entries, dense attention loops over every block and skips the
future ones). The host reads the device only to stream tokens or, every `check_every` steps, to
stop early once every sequence has finished.

Prefill runs one sequence at a time, layer by layer, in chunks of `prefill_chunk` tokens: each
chunk appends its keys, updates the block keys, selects for its queries and attends over the
layer's cache so far. Offloaded layers are built in a device scratch buffer, then copied to host.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..layers.rope import rope_cos_sin
from .attend import block_attention
from .cache import BlockKVCache
from .gather import gather_blocks, write_tokens
from .select import finish_selection, forecast_scores, slot_update, ssa_scores

MODES = ("dense", "sparse", "offload", "sparda")


def model_has_forecasts(model) -> bool:
    has = getattr(model, "has_forecasts", False)
    if callable(has):
        has = has()
    return bool(has) and getattr(model, "forecasts", None) is not None and getattr(model, "self_forecast", None) is not None


@dataclass
class GenerationResult:
    tokens: list  # per sequence: generated token ids (a stop token ends its row and is kept)
    prompt_lengths: list
    counters: dict = field(default_factory=dict)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Greedy (temperature 0) or sampled with nucleus truncation; no host synchronisation."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) > top_p  # the top token always stays
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    noise = torch.empty_like(probs).exponential_(generator=generator)  # Gumbel-max in exponential form
    return (probs / noise).argmax(dim=-1)


class GraphedDecode:
    """Decode steps for `Engine.generate(cuda_graph=True)`: the first `warmup` steps run eagerly, the
    next one is captured in a CUDA graph (`capture`, default `engine.capture_graph`) and every step from
    then on is a replay with the new tokens copied into the graph's static input: the same kernels
    without the per-step Python and launch cost. Capturing records a step without running it, so the
    step is replayed right after; the engine's host-side step counters are kept as in eager decoding."""

    def __init__(self, engine: "Engine", warmup: int = 2, capture=None):
        self.engine, self.warmup, self.eager_steps = engine, warmup, 0
        self.capture = capture or (lambda tokens: engine.capture_graph(tokens, warmup=0))
        self.graph = self.static = self.logits = None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        eng = self.engine
        if self.eager_steps < self.warmup:
            self.eager_steps += 1
            return eng.decode_step(tokens)
        if self.graph is None:
            self.static = tokens.clone()
            self.graph, self.logits = self.capture(self.static)
            eng._step -= 1  # the capture ran decode_step's Python, not its kernels
            eng._decode_steps -= 1
        else:
            self.static.copy_(tokens)
        self.graph.replay()
        eng._step += 1
        eng._decode_steps += 1
        return self.logits

    def close(self) -> None:
        self.graph = self.static = self.logits = None
        self.engine.graph = None


class Engine:
    def __init__(self, model, *, mode: str = "sparse", max_batch: int = 1, max_len: int | None = None,
                 topk: int | None = None, prefill_chunk: int = 512, gather: str = "auto", check_every: int = 32,
                 timing: bool = True, backend: str = "auto", host_memory_limit: int | None = None, device_memory_limit: int | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "sparda" and not model_has_forecasts(model):
            raise ValueError("mode 'sparda' needs a model with forecasts (model.has_forecasts, model.forecasts, "
                             "model.self_forecast); this model has none: distill them first or use mode 'offload'")
        cfg = model.config
        for name, value in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        max_len = cfg.max_seq_len if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        sc = cfg.sparse
        topk = sc.topk if topk is None else topk
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < sc.init_blocks + sc.local_blocks:
            raise ValueError(f"topk must be an int >= init_blocks + local_blocks ({sc.init_blocks + sc.local_blocks}), got {topk!r}")
        self.model = model.eval()
        self.config = cfg
        self.mode = mode
        self.max_batch, self.max_len = max_batch, max_len
        self.topk, self.block_size = topk, sc.block_size
        self.init_blocks, self.local_blocks = sc.init_blocks, sc.local_blocks
        self.prefill_chunk = prefill_chunk
        if backend not in ("auto", "triton", "reference"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
        if gather not in ("auto", "kernel", "index", "copies", "staged"):
            raise ValueError(f"gather must be 'auto', 'kernel', 'index', 'copies' or 'staged', got {gather!r}")
        self.backend = backend
        self.gather = "kernel" if (gather == "auto" and backend == "triton") else gather
        self.write_method = "kernel" if backend == "triton" else "auto"
        self._kernels = {"triton": "kernel", "reference": "torch"}.get(backend, "auto")  # selection helpers
        self.check_every = check_every
        self.timing = timing
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.n_layers = cfg.n_layers
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        offload = [mode in ("offload", "sparda") and layer > 0 for layer in range(self.n_layers)]
        kw = dict(n_layers=self.n_layers, batch=max_batch, n_heads=self.n_kv, head_dim=self.head_dim, max_len=max_len,
                  block_size=self.block_size, slots=topk, offload_layers=offload, keep_kbar=mode != "dense",
                  dtype=self.dtype, device=self.device)
        self.memory = BlockKVCache.plan(**kw, workspace=self._workspace_bytes())
        self.memory.check(self.device, host_memory_limit, device_memory_limit)
        self.cache = BlockKVCache(**kw)
        self.cuda = self.device.type == "cuda"
        self.prefetch_stream = torch.cuda.Stream(self.device) if self.cuda and mode == "sparda" else None
        self.done_events = [torch.cuda.Event() if self.prefetch_stream is not None else None for _ in range(self.n_layers)]
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.batch = 0
        self.record: dict | None = None  # set to {} to record every selection
        self.replay: dict | None = None  # {key: selection} replaces the engine's own selections
        # benchmarks: an object with scores(layer, score) -> score and observe(layer, selection) that
        # rewrites decode-step scores (sparsa.serve.testing.LocalitySelection); None in normal use
        self.selection_model = None
        self._step = 0
        self._pending: dict = {}
        self._keep: list = []
        self.graph = None
        self.reset_counters()

    # ------------------------------------------------------------------ bookkeeping
    def _workspace_bytes(self) -> int:
        cfg = self.config
        es = torch.empty((), dtype=next(self.model.parameters()).dtype).element_size()
        t, c = self.max_len, min(self.prefill_chunk, self.max_len)
        n_blocks = -(-t // self.block_size)
        prefill = 3 * t * cfg.d_model * es + 4 * t * self.n_kv * self.head_dim * es  # embeddings, hidden, k, v, scratch
        if self.mode == "dense":  # whole-prompt attention: u, q, k and v repeated to every head, out, o_proj
            prefill += 2 * t * cfg.d_model * es + 5 * t * cfg.n_heads * self.head_dim * es
        prefill += c * max(3 * cfg.d_ff * es, 5 * cfg.n_heads * n_blocks * 4)  # MLP chunk or selection scores
        prefill += t * self.n_kv * self.head_dim * es  # sparda: the next layer's forecasts
        decode = self.max_batch * (4 * cfg.vocab_size * 4 + 2 * self.n_heads * self.head_dim * 4 * 16)
        return int(1.25 * (prefill + decode)) + (512 << 20)

    def reset_counters(self) -> None:
        if getattr(self, "_totals", None) is not None:  # zero in place: captured graphs hold it
            self._totals.zero_()
        else:
            self._totals = torch.zeros(2, dtype=torch.long, device=self.device)  # block hits, misses
        self._wait_events: list = []
        self._decode_steps = 0

    def counters(self) -> dict:
        """Block hit rate, bytes moved host -> device, time the attention waited for the prefetch."""
        hits, misses = (int(x) for x in self._totals.tolist())
        lookups = hits + misses
        block_bytes = 2 * self.block_size * self.head_dim * torch.empty((), dtype=self.dtype).element_size()
        wait_ms = 0.0
        if self._wait_events:
            torch.cuda.synchronize(self.device)
            wait_ms = sum(a.elapsed_time(b) for a, b in self._wait_events)
        return {"mode": self.mode, "block_lookups": lookups, "block_hits": hits, "block_misses": misses,
                "hit_rate": hits / lookups if lookups else float("nan"), "bytes_moved": misses * block_bytes,
                "prefetch_wait_s": wait_ms / 1e3, "decode_steps": self._decode_steps}

    def _selection(self, key, rule: str, x: torch.Tensor, kbar: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Selection [R, H, topk] for rows at `pos`: rule "ssa" (x = queries [R, Hq, D]) or "forecast"
        (x = forecasts [R, H, D]); `self.replay[key]` replaces it, `self.record[key]` keeps a copy."""
        if self.replay is not None and key in self.replay:
            sel = self.replay[key].to(self.device)
        else:
            if rule == "forecast":
                score = forecast_scores(x, kbar, method=self._kernels)
            else:
                score = ssa_scores(x, kbar, pos, block_size=self.block_size, scale=self.scale, method=self._kernels)
            synthetic = self.selection_model is not None and key[0] == "decode"
            if synthetic:  # the real scores are still computed: same cost, synthetic values
                score = self.selection_model.scores(key[-1], score)
            sel = self._finish(score, pos)
            if synthetic:
                self.selection_model.observe(key[-1], sel)
        if self.record is not None:
            self.record[key] = sel.detach().clone()
        return sel

    def _check_prompts(self, prompts, max_new_tokens: int) -> list[list[int]]:
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of token lists")
        if len(prompts) > self.max_batch:
            raise ValueError(f"prompts: batch of {len(prompts)} exceeds the engine capacity max_batch={self.max_batch}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        out = []
        for i, p in enumerate(prompts):
            p = list(p)
            if len(p) == 0:
                raise ValueError(f"prompts[{i}] is empty")
            if len(p) + max_new_tokens > self.max_len:
                raise ValueError(f"prompts[{i}]: {len(p)} tokens + max_new_tokens {max_new_tokens} exceed the "
                                 f"context max_len={self.max_len}")
            if min(p) < 0 or max(p) >= self.config.vocab_size:
                raise ValueError(f"prompts[{i}] holds a token outside [0, {self.config.vocab_size})")
            out.append(p)
        return out

    # ------------------------------------------------------------------ selection helpers
    def _finish(self, score, pos):
        return finish_selection(score, pos, block_size=self.block_size, topk=self.topk,
                                init_blocks=self.init_blocks, local_blocks=self.local_blocks, method=self._kernels)

    def _dense_entries(self, pos: torch.Tensor) -> torch.Tensor:
        nb = self.cache.n_blocks
        blocks = torch.arange(nb, device=self.device)[None, None, :].expand(pos.shape[0], self.n_kv, nb)
        cur = torch.div(pos, self.block_size, rounding_mode="floor")[:, None, None]
        return torch.where(blocks <= cur, blocks, torch.full_like(blocks, -1))

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, prompts) -> torch.Tensor:
        """Fills the cache for a new batch; returns the last prompt token's logits [B, vocab]."""
        prompts = self._check_prompts(prompts, 0)
        self.batch = len(prompts)
        self.cache.reset_rows(self.batch)
        logits = [self._prefill_one(b, torch.tensor(p, dtype=torch.long, device=self.device))
                  for b, p in enumerate(prompts)]
        self.lengths[: self.batch] = torch.tensor([len(p) for p in prompts], device=self.device)
        self._step = 0
        return torch.cat(logits, dim=0)

    def _prefill_one(self, b: int, tokens: torch.Tensor) -> torch.Tensor:
        model, cache, bs = self.model, self.cache, self.block_size
        seqlen = tokens.shape[0]
        nb_used = -(-seqlen // bs)
        positions = torch.arange(seqlen, device=self.device)
        cos, sin = rope_cos_sin(positions[None], model.inv_freq)
        x = model.embed(tokens)[None]  # [1, T, d]
        chunk = self.prefill_chunk
        forecast_next = None  # sparda: f for this layer, computed by the previous one [T, H, D]
        scratch = None
        for layer_idx, layer in enumerate(model.layers):
            attn = layer.attn
            off = cache.offload[layer_idx]
            if off:
                if scratch is None:
                    scratch = torch.zeros((2, 1, self.n_kv, cache.n_blocks, bs, self.head_dim), dtype=self.dtype,
                                          device=self.device)
                pool_k, pool_v = scratch[0], scratch[1]
            else:
                pool_k, pool_v = cache.k[layer_idx][b:b + 1], cache.v[layer_idx][b:b + 1]
            flat_k = pool_k.view(1, self.n_kv, -1, self.head_dim)
            flat_v = pool_v.view(1, self.n_kv, -1, self.head_dim)
            kbar = cache.kbar[layer_idx]
            f_layer = None
            if self.mode == "dense":
                u = layer.attn_norm(x)
                q, k, v = attn.project(u, cos, sin)
                flat_k[0, :, :seqlen] = k[0].transpose(0, 1)
                flat_v[0, :, :seqlen] = v[0].transpose(0, 1)
                from ..ops import attention

                h = attention(q, k, v, causal=True)
                gate = attn.gate(u)
                if gate is not None:
                    h = h * gate.to(h.dtype)
                x = x + attn.o_proj(h.reshape(1, seqlen, -1))
                for s in range(0, seqlen, chunk):
                    xs = x[:, s:s + chunk]
                    x[:, s:s + chunk] = xs + layer.mlp(layer.mlp_norm(xs))
                continue
            if self.mode == "sparda" and layer_idx + 1 < self.n_layers:
                f_layer = torch.empty((seqlen, self.n_kv, self.head_dim), dtype=self.dtype, device=self.device)
            for s in range(0, seqlen, chunk):
                e = min(s + chunk, seqlen)
                u = layer.attn_norm(x[:, s:e])
                cs, sn = cos[:, s:e], sin[:, s:e]
                q, k, v = attn.project(u, cs, sn)
                flat_k[0, :, s:e] = k[0].transpose(0, 1)
                flat_v[0, :, s:e] = v[0].transpose(0, 1)
                # block keys of the blocks completed by this chunk
                c0, c1 = s // bs, e // bs
                if c1 > c0:
                    kbar[b, :, c0:c1] = pool_k[0, :, c0:c1].float().mean(dim=2).to(self.dtype)
                pos = positions[s:e]
                if self.mode == "sparda":
                    if f_layer is not None:
                        f_layer[s:e] = model.forecasts[layer_idx](u, cs, sn)[0]
                    f_rows = model.self_forecast(u, cs, sn)[0] if layer_idx == 0 else forecast_next[s:e]
                    sel = self._selection(("prefill", b, layer_idx, s), "forecast", f_rows, kbar[b], pos)
                else:
                    sel = self._selection(("prefill", b, layer_idx, s), "ssa", q[0], kbar[b], pos)
                h = block_attention(q[0], pool_k, pool_v, sel, sel, pos, block_size=bs, scale=self.scale,
                                    shared=True, backend=self.backend)[None]
                gate = attn.gate(u)
                if gate is not None:
                    h = h * gate.to(h.dtype)
                xs = x[:, s:e] + attn.o_proj(h.reshape(1, e - s, -1))
                x[:, s:e] = xs + layer.mlp(layer.mlp_norm(xs))
            if off:  # one contiguous copy per head: PyTorch copies a strided [H, nb_used] view to the host
                # through a pageable staging tensor and a CPU copy, synchronously
                for h in range(self.n_kv):
                    cache.host_k[layer_idx][b, h, :nb_used].copy_(pool_k[0, h, :nb_used], non_blocking=True)
                    cache.host_v[layer_idx][b, h, :nb_used].copy_(pool_v[0, h, :nb_used], non_blocking=True)
                cur = (seqlen - 1) // bs
                cache.tail_k[layer_idx][b].copy_(pool_k[0, :, cur])
                cache.tail_v[layer_idx][b].copy_(pool_v[0, :, cur])
            forecast_next = f_layer
        if scratch is not None and self.cuda:
            torch.cuda.current_stream(self.device).synchronize()  # scratch copies done before it is freed
        last = model.norm(x[:, -1:])
        return model.lm_head(last)[:, 0].float()

    # ------------------------------------------------------------------ decode
    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Appends one token per sequence ([B] on the device) and returns the next logits [B, vocab]."""
        model, cache, bs = self.model, self.cache, self.block_size
        batch = self.batch
        pos = self.lengths[:batch]
        rows = torch.arange(batch, device=self.device)
        blk = torch.div(pos, bs, rounding_mode="floor")
        off = pos - blk * bs
        complete = (off == bs - 1)[:, None, None]
        cos, sin = rope_cos_sin(pos[:, None], model.inv_freq)
        x = model.embed(tokens[:, None])  # [B, 1, d]
        step = self._step
        self._keep = []
        next_sel = None
        for layer_idx, layer in enumerate(model.layers):
            attn = layer.attn
            u = layer.attn_norm(x)
            q, k, v = attn.project(u, cos, sin)
            q, k, v = q[:, 0], k[:, 0], v[:, 0]
            if self.mode == "sparda":
                if layer_idx + 1 < self.n_layers:  # PREP(l+1): forecast, select, diff, launch the copy
                    f = model.forecasts[layer_idx](u, cos, sin)[:, 0]
                    kb = cache.kbar[layer_idx + 1][:batch]
                    nxt = self._selection(("decode", step, layer_idx + 1), "forecast", f, kb, pos)
                    self._prefetch(layer_idx + 1, nxt, blk, batch)
                if layer_idx == 0:
                    f0 = model.self_forecast(u, cos, sin)[:, 0]
                    kb0 = cache.kbar[0][:batch]
                    cur_sel = self._selection(("decode", step, 0), "forecast", f0, kb0, pos)
                else:
                    cur_sel = next_sel
                if layer_idx + 1 < self.n_layers:
                    next_sel = nxt
            # append the new token
            off_layer = cache.offload[layer_idx]
            if off_layer:
                cache.tail_k[layer_idx][rows, :, off] = k
                cache.tail_v[layer_idx][rows, :, off] = v
                write_tokens(cache.host_k[layer_idx], cache.host_v[layer_idx], k, v, pos, method=self.write_method)
                block_data = cache.tail_k[layer_idx][:batch]
            else:
                cache.k[layer_idx][rows, :, blk, off] = k
                cache.v[layer_idx][rows, :, blk, off] = v
                block_data = cache.k[layer_idx][rows, :, blk] if self.mode != "dense" else None
            if self.mode != "dense":
                kb = cache.kbar[layer_idx]
                mean = block_data.float().mean(dim=2).to(self.dtype)  # [B, H, D]
                kb[rows, :, blk] = torch.where(complete, mean, kb[rows, :, blk])
            # selection and attention
            if self.mode == "dense":
                entries = self._dense_entries(pos)
                h = block_attention(q, cache.k[layer_idx][:batch], cache.v[layer_idx][:batch], entries, entries, pos,
                                    block_size=bs, scale=self.scale, backend=self.backend)
            else:
                if self.mode in ("sparse", "offload"):
                    kb = cache.kbar[layer_idx][:batch]
                    cur_sel = self._selection(("decode", step, layer_idx), "ssa", q, kb, pos)
                if not off_layer:
                    h = block_attention(q, cache.k[layer_idx][:batch], cache.v[layer_idx][:batch], cur_sel, cur_sel,
                                        pos, block_size=bs, scale=self.scale, backend=self.backend)
                else:
                    if self.mode == "offload":
                        self._prefetch(layer_idx, cur_sel, blk, batch, inline=True)
                    idx = self._wait(layer_idx)  # slot of each entry, 0 for the current block (tail)
                    h = block_attention(q, cache.slot_k[layer_idx][:batch], cache.slot_v[layer_idx][:batch], idx, cur_sel,
                                        pos, block_size=bs, scale=self.scale, tail_k=cache.tail_k[layer_idx][:batch],
                                        tail_v=cache.tail_v[layer_idx][:batch], backend=self.backend)
            gate = attn.gate(u)
            h = h[:, None]
            if gate is not None:
                h = h * gate.to(h.dtype)
            x = x + attn.o_proj(h.reshape(batch, 1, -1))
            x = x + layer.mlp(layer.mlp_norm(x))
        self.lengths[:batch] += 1
        self._step += 1
        self._decode_steps += 1
        return model.lm_head(model.norm(x))[:, 0].float()

    @torch.no_grad()
    def replicate(self, n: int, host_rows: int | None = None) -> None:
        """Benchmark helper: copies sequence 0's cache (after `prefill` of one prompt) into rows 0..n-1.
        `host_rows` limits the host-memory copy to the first rows (the others keep their host contents:
        same transfer volume, other values), which saves minutes of memcpy at large batches."""
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"n must be in [1, max_batch={self.max_batch}], got {n}")
        c = self.cache
        host_n = n if host_rows is None else max(1, min(n, host_rows))
        for layer in range(self.n_layers):
            for lst in (c.k, c.v, c.kbar, c.tail_k, c.tail_v, c.host_k, c.host_v):
                t = lst[layer]
                rows = host_n if lst is c.host_k or lst is c.host_v else n
                if t is not None and rows > 1:
                    t[1:rows].copy_(t[0:1].expand(rows - 1, *t.shape[1:]))
        c.reset_rows(n)
        self.lengths[:n] = self.lengths[0].clone()
        self.batch = n

    def set_batch(self, n: int) -> None:
        """Benchmark helper: decode only the first n rows from now on (they must hold sequences)."""
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"n must be in [1, max_batch={self.max_batch}], got {n}")
        self.batch = n
        self.graph = None

    def capture_graph(self, tokens: torch.Tensor, warmup: int = 2):
        """Captures one decode step (CUDA only) into a CUDA graph; returns (graph, static logits).
        Replaying it appends `tokens` (a static buffer: write the next tokens into it first)."""
        if not self.cuda:
            raise ValueError("capture_graph needs a CUDA device")
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.decode_step(tokens)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.decode_step(tokens)
        self.graph = graph
        return graph, logits

    def close(self) -> None:
        """Releases the pinned host memory now (also done when the engine is garbage collected)."""
        self.graph = None
        self.cache.release()

    def _prefetch(self, layer_idx: int, sel: torch.Tensor, cur_blk: torch.Tensor, batch: int, inline: bool = False):
        """Slot diff for `layer_idx`, then the host -> device copy of the missing blocks (side stream in sparda)."""
        cache = self.cache
        bm = cache.block_map[layer_idx][:batch]
        # block map updated in place, hit/miss totals accumulated, entry slots with 0 for the current
        # block (attention reads it from the tail)
        load, entry_slot = slot_update(sel, bm, cur_blk, self._totals, current_slot=0, method=self._kernels)
        self._keep.append(load)  # alive until the step ends: the side stream reads it
        args = (cache.host_k[layer_idx][:batch], cache.host_v[layer_idx][:batch],
                cache.slot_k[layer_idx][:batch], cache.slot_v[layer_idx][:batch], load)
        stream = self.prefetch_stream
        if inline or stream is None:
            gather_blocks(*args, method=self.gather)
        else:
            main = torch.cuda.current_stream(self.device)
            ready = torch.cuda.Event()
            ready.record(main)
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                if not torch.cuda.is_current_stream_capturing():
                    load.record_stream(stream)
                gather_blocks(*args, method=self.gather)
                self.done_events[layer_idx].record(stream)
        self._pending[layer_idx] = entry_slot

    def _wait(self, layer_idx: int) -> torch.Tensor:
        """Entry slots of `layer_idx`'s selection; in sparda, first make the main stream wait for its copy."""
        entry_slot = self._pending.pop(layer_idx)
        event = self.done_events[layer_idx]
        if self.mode == "sparda" and event is not None:
            main = torch.cuda.current_stream(self.device)
            if self.timing and not torch.cuda.is_current_stream_capturing():
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(main)
                main.wait_event(event)
                b.record(main)
                self._wait_events.append((a, b))
            else:
                main.wait_event(event)
        return entry_slot

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompts, *, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop_tokens=(), on_step=None,
                 cuda_graph: bool | None = None) -> GenerationResult:
        """Prefill `prompts` (lists of token ids, lengths may differ), then decode.

        temperature 0 = greedy; top_p in (0, 1] nucleus sampling; seed makes sampling reproducible;
        a sequence stops after emitting one of `stop_tokens`. `on_step(step, tokens [B] on the
        device)` is called after every sampled token (for streaming; reading it synchronises).
        cuda_graph=True (CUDA; modes sparse, offload, sparda): after two eager steps the decode step
        is captured once and replayed (`GraphedDecode`). None (default): on wherever it applies
        (CUDA, not dense, no selection record/replay); False: eager steps.
        """
        if cuda_graph is not None and not isinstance(cuda_graph, bool):
            raise ValueError(f"cuda_graph must be a bool or None, got {cuda_graph!r}")
        if cuda_graph is None:
            cuda_graph = self.cuda and self.mode != "dense" and self.record is None and self.replay is None
        if cuda_graph and not self.cuda:
            raise ValueError("cuda_graph=True needs a CUDA device")
        if cuda_graph and self.mode == "dense":
            raise ValueError("cuda_graph=True supports the modes sparse, offload and sparda, not dense")
        if cuda_graph and (self.record is not None or self.replay is not None):
            raise ValueError("cuda_graph=True cannot record or replay selections (they need Python per step)")
        if not isinstance(temperature, (int, float)) or temperature < 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        prompts = self._check_prompts(prompts, max_new_tokens)
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(0 if seed is None else int(seed))
        stop = torch.tensor(sorted(set(int(t) for t in stop_tokens)) or [-1], dtype=torch.long, device=self.device)
        self.reset_counters()
        t0 = time.perf_counter()
        logits = self.prefill(prompts)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        t1 = time.perf_counter()
        batch = len(prompts)
        out = torch.full((batch, max(max_new_tokens, 1)), -1, dtype=torch.long, device=self.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        steps = 0
        decode = GraphedDecode(self) if cuda_graph else self.decode_step
        for step in range(max_new_tokens):
            token = sample_tokens(logits, temperature, top_p, generator)
            token = torch.where(finished, torch.full_like(token, -1), token)
            out[:, step] = token
            finished |= torch.isin(token, stop)
            steps = step + 1
            if on_step is not None:
                on_step(step, token)
            if step == max_new_tokens - 1:
                break
            if self.check_every and (step + 1) % self.check_every == 0 and bool(finished.all()):
                break
            logits = decode(torch.where(token < 0, torch.zeros_like(token), token))
        if self.cuda:
            torch.cuda.synchronize(self.device)
        t2 = time.perf_counter()
        if cuda_graph:
            decode.close()
        rows = []
        for r in out[:, :steps].tolist():
            kept = []
            for t in r:
                if t < 0:
                    break
                kept.append(t)
            rows.append(kept)
        return GenerationResult(tokens=rows, prompt_lengths=[len(p) for p in prompts], counters=self.counters(),
                                prefill_s=t1 - t0, decode_s=t2 - t1, steps=steps)
