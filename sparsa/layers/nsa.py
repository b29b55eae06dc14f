"""NSA's three attention branches (compressed, selected, sliding window) with per-head sigmoid gates.

`NSABranches` takes the already projected (and RoPE'd) q, k, v of a layer; the projections, RoPE and
o_proj stay with the caller (`SparseAttention(variant="nsa")`). It owns the gate projection and the
compression MLP:

    o = g_cmp * Attn(q, Kc, Vc) + g_slc * Attn(q, K[selected blocks], V[...]) + g_win * Attn(q, K[t-w+1..t], ...)
    (g_cmp, g_slc, g_win) = sigmoid(gate_proj(x)).view(B, T, 3, Hq)     # per token and query head

  compressed   Kc = phi_k(k_raw windows), Vc = phi_v(v windows); window i covers tokens
               [i*d, i*d + l) and is visible to query t iff i*d + l - 1 <= t (`sparsa.ops.compress`);
               phi = learnable MLP  flatten(window + pos_emb) @ W  (W initialised to mean pooling;
               values get no position embedding), or plain mean pooling (`compress="mean"`).
               RoPE: with `k_raw` (un-rotated keys) the compressed keys are rotated at position i*d
               (window start, as in the NSA references); without it the rotated k is compressed and
               not rotated again.
  selected     NSA scoring (`select_blocks(score="nsa")`: the compressed branch's probabilities,
               re-binned onto blocks of `block_size` by overlap weights, summed over the GQA group;
               forced `init_blocks` / `local_blocks`; top-`topk`) then `sparsa.sparse_attention`.
               Selection carries no gradient; Kc receives gradient only through the compressed branch.
  window       `sparsa.ops.window.window_attention` over the `window` most recent tokens.

All three branches use the same scale (default 1/sqrt(D)), are normalised separately, and never cross
packed-document boundaries (`cu_seqlens`, B = 1; positions local to each document).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops import select_blocks, sparse_attention
from ..ops.compress import compressed_attention, compressed_cu_seqlens, mean_pool, mlp_compress
from ..ops.window import window_attention
from .rope import apply_rope, rope_cos_sin, rope_frequencies

COMPRESS_MODES = ("mlp", "mean")


class NSABranches(nn.Module):
    """NSA attention branches + gates on projected q/k/v.

    Args:
        hidden_size: width of x, the gate input (the layer's normalised hidden state).
        n_heads, n_kv_heads: query / KV heads (GQA: any n_heads % n_kv_heads == 0).
        head_dim: q/k head dim D; v_head_dim: Dv (default D).
        block_size, topk, init_blocks, local_blocks: selection (paper: 64, 16, 1, 2; topk includes the
            forced blocks).
        compress_length, compress_stride: l, d (paper 32, 16); block_size % compress_stride == 0.
        window: sliding window w (paper 512).
        compress: "mlp" (learnable, NSA) or "mean" (parameter-free mean pooling).
        rope_theta: RoPE base used to rotate compressed keys when `k_raw` is given (rotate-half
            convention of `sparsa.layers.rope`).

    forward(x, q, k, v, *, k_raw=None, cu_seqlens=None, scale=None, return_parts=False):
        x [B, T, hidden_size]; q [B, T, Hq, D] rotated; k [B, T, Hkv, D] rotated; v [B, T, Hkv, Dv];
        k_raw [B, T, Hkv, D] un-rotated keys (optional, see the module docstring);
        cu_seqlens int32 [n_docs + 1] with B = 1 for packed documents.
        Returns o [B, T, Hq, Dv] (gated sum of the three branches, before o_proj), or with
        `return_parts` the tuple (o, parts) where parts holds o_cmp, o_slc, o_win, gates
        [B, T, 3, Hq], block_indices [B, T, Hkv, topk] and lse_cmp [B, T, Hq].
    """

    def __init__(
        self,
        hidden_size: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        v_head_dim: int | None = None,
        block_size: int = 64,
        topk: int = 16,
        init_blocks: int = 1,
        local_blocks: int = 2,
        compress_length: int = 32,
        compress_stride: int = 16,
        window: int = 512,
        compress: str = "mlp",
        rope_theta: float = 10000.0,
    ):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads),
                            ("head_dim", head_dim), ("block_size", block_size), ("topk", topk),
                            ("local_blocks", local_blocks), ("compress_length", compress_length),
                            ("compress_stride", compress_stride), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if block_size % compress_stride != 0:
            raise ValueError(f"block_size ({block_size}) must be a multiple of compress_stride ({compress_stride})")
        if compress not in COMPRESS_MODES:
            raise ValueError(f"compress must be one of {COMPRESS_MODES}, got {compress!r}")
        if topk < init_blocks + local_blocks:
            raise ValueError(f"topk ({topk}) must be >= init_blocks + local_blocks ({init_blocks + local_blocks})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.block_size, self.topk, self.init_blocks, self.local_blocks = block_size, topk, init_blocks, local_blocks
        self.compress_length, self.compress_stride, self.window = compress_length, compress_stride, window
        self.compress, self.rope_theta = compress, rope_theta
        self.gate_proj = nn.Linear(hidden_size, 3 * n_heads, bias=False)
        if compress == "mlp":
            self.k_compress = nn.Parameter(self._mean_init(n_kv_heads, compress_length, head_dim))
            self.v_compress = nn.Parameter(self._mean_init(n_kv_heads, compress_length, self.v_head_dim))
            self.k_pos_emb = nn.Parameter(torch.zeros(n_kv_heads, compress_length, head_dim))
        else:
            self.register_parameter("k_compress", None)
            self.register_parameter("v_compress", None)
            self.register_parameter("k_pos_emb", None)

    @staticmethod
    def _mean_init(n_heads: int, length: int, dim: int) -> torch.Tensor:
        """[H, length*dim, dim]: stacked identities / length, i.e. mean pooling at initialisation."""
        eye = torch.eye(dim).repeat(length, 1) / length
        return eye[None].repeat(n_heads, 1, 1)

    def extra_repr(self) -> str:
        return (f"heads={self.n_heads}/{self.n_kv_heads}, block={self.block_size}, topk={self.topk}, "
                f"l={self.compress_length}, d={self.compress_stride}, window={self.window}, compress={self.compress}")

    def compressed_kv(self, k_source: torch.Tensor, v: torch.Tensor, cu_seqlens=None, rotate: bool = False):
        """Compressed keys/values [B, Nc, Hkv, D / Dv]; keys rotated at i*stride when `rotate`."""
        l, d = self.compress_length, self.compress_stride
        if self.compress == "mlp":
            kc = mlp_compress(k_source, self.k_compress, self.k_pos_emb, length=l, stride=d, cu_seqlens=cu_seqlens)
            vc = mlp_compress(v, self.v_compress, None, length=l, stride=d, cu_seqlens=cu_seqlens)
        else:
            kc = mean_pool(k_source, length=l, stride=d, cu_seqlens=cu_seqlens)
            vc = mean_pool(v, length=l, stride=d, cu_seqlens=cu_seqlens)
        kc, vc = kc.to(v.dtype), vc.to(v.dtype)
        if rotate and kc.shape[1] > 0:
            positions = self.compressed_positions(kc.shape[1], cu_seqlens, kc.device)  # [1, Nc]
            inv_freq = rope_frequencies(self.head_dim, self.rope_theta, device=kc.device)
            cos, sin = rope_cos_sin(positions, inv_freq)
            kc = apply_rope(kc, cos, sin)
        return kc, vc

    def compressed_positions(self, n_compressed: int, cu_seqlens, device) -> torch.Tensor:
        """Position (window start i*stride, local to its document) of every compressed token: [1, Nc]."""
        d = self.compress_stride
        if cu_seqlens is None:
            return (torch.arange(n_compressed, device=device) * d)[None, :]
        ccu = compressed_cu_seqlens(cu_seqlens, self.compress_length, d).tolist()
        pieces = [torch.arange(e - s, device=device) * d for s, e in zip(ccu[:-1], ccu[1:])]
        return torch.cat(pieces)[None, :]

    def forward(self, x, q, k, v, *, k_raw=None, cu_seqlens=None, scale=None, return_parts: bool = False):
        batch, seqlen, n_heads, _ = q.shape
        if x.shape[:2] != (batch, seqlen) or n_heads != self.n_heads or k.shape[2] != self.n_kv_heads:
            raise ValueError(f"x {tuple(x.shape)}, q {tuple(q.shape)}, k {tuple(k.shape)} do not match the module "
                             f"(Hq={self.n_heads}, Hkv={self.n_kv_heads})")
        if k_raw is not None and k_raw.shape != k.shape:
            raise ValueError(f"k_raw {tuple(k_raw.shape)} must have the shape of k {tuple(k.shape)}")
        l, d = self.compress_length, self.compress_stride

        kc, vc = self.compressed_kv(k if k_raw is None else k_raw, v, cu_seqlens, rotate=k_raw is not None)
        o_cmp, lse_cmp = compressed_attention(q, kc, vc, length=l, stride=d, scale=scale, cu_seqlens=cu_seqlens,
                                              return_lse=True)
        block_indices = select_blocks(
            q.detach(), k.detach(), block_size=self.block_size, topk=self.topk, init_blocks=self.init_blocks,
            local_blocks=self.local_blocks, scale=scale, cu_seqlens=cu_seqlens, score="nsa",
            compress_length=l, compress_stride=d, compressed_keys=kc.detach(), compressed_lse=lse_cmp.detach(),
        )
        o_slc = sparse_attention(q, k, v, block_indices, block_size=self.block_size, scale=scale,
                                 cu_seqlens=cu_seqlens)
        o_win = window_attention(q, k, v, window=self.window, scale=scale, cu_seqlens=cu_seqlens)
        gates = torch.sigmoid(self.gate_proj(x)).view(batch, seqlen, 3, n_heads)  # [B, T, 3, Hq]
        g = gates.to(o_cmp.dtype)[..., None]  # [B, T, 3, Hq, 1]
        out = g[:, :, 0] * o_cmp + g[:, :, 1] * o_slc + g[:, :, 2] * o_win
        if not return_parts:
            return out
        parts = dict(o_cmp=o_cmp, o_slc=o_slc, o_win=o_win, gates=gates, block_indices=block_indices,
                     lse_cmp=lse_cmp)
        return out, parts
