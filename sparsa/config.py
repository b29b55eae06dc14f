"""Configuration dataclasses: sparse-attention geometry, model shape and presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class SparseConfig:
    """Block selection geometry shared by selection, attention and evaluation."""

    block_size: int = 16
    topk: int = 8
    init_blocks: int = 0
    local_blocks: int = 1

    def __post_init__(self):
        for name in ("block_size", "topk", "local_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.init_blocks, int) or self.init_blocks < 0:
            raise ValueError(f"init_blocks must be a non-negative int, got {self.init_blocks!r}")
        if self.topk < self.init_blocks + self.local_blocks:
            raise ValueError(f"topk ({self.topk}) must be >= init_blocks + local_blocks")

    @property
    def receptive_field(self) -> int:
        return self.block_size * self.topk


VARIANTS = ("ssa", "nsa")


@dataclass
class ModelConfig:
    """A Llama-style decoder (RMSNorm, RoPE, SwiGLU, GQA, sigmoid output gate)."""

    vocab_size: int = 256
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None
    d_ff: int = 192
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    output_gate: bool = True
    attention_bias: bool = False
    sparse: SparseConfig = field(default_factory=SparseConfig)
    # "ssa": the sparse mode is selected-block attention only (SSA / MoBA-style);
    # "nsa": the sparse mode is NSA's three gated branches (compressed, selected, window)
    variant: str = "ssa"
    nsa_compress_length: int | None = None  # default block_size // 2 (NSA: 32 for block 64)
    nsa_compress_stride: int | None = None  # default block_size // 4 (NSA: 16 for block 64)
    nsa_window: int | None = None  # default 8 * block_size (NSA: 512 for block 64)
    nsa_compress: str = "mlp"  # "mlp" (learned, NSA) or "mean"

    def __post_init__(self):
        if isinstance(self.sparse, dict):
            self.sparse = SparseConfig(**self.sparse)
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        bs = self.sparse.block_size
        if self.nsa_compress_length is None:
            self.nsa_compress_length = max(1, bs // 2)
        if self.nsa_compress_stride is None:
            self.nsa_compress_stride = max(1, bs // 4)
        if self.nsa_window is None:
            self.nsa_window = 8 * bs
        if self.head_dim is None:
            if self.d_model % self.n_heads != 0:
                raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
            self.head_dim = self.d_model // self.n_heads

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)


PRESETS: dict[str, ModelConfig] = {
    # a training step in well under a second on 2 CPU cores
    "tiny": ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=192, max_seq_len=256,
                        sparse=SparseConfig(block_size=16, topk=4)),
    # about 30M parameters, for one GPU (byte vocabulary)
    "small": ModelConfig(n_layers=10, d_model=512, n_heads=8, n_kv_heads=2, d_ff=1536, max_seq_len=2048,
                         sparse=SparseConfig(block_size=16, topk=8)),
    # the SSA reproduction model (experiments/ssa_repro.py): `small` with 6 layers, about 19M parameters
    "repro": ModelConfig(n_layers=6, d_model=512, n_heads=8, n_kv_heads=2, d_ff=1536, max_seq_len=2048,
                         sparse=SparseConfig(block_size=16, topk=8)),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    data = PRESETS[name].to_dict()
    for derived in ("nsa_compress_length", "nsa_compress_stride", "nsa_window"):
        data[derived] = None  # re-derived from the (possibly overridden) block size
    sparse = dict(data.pop("sparse"))
    for key in list(overrides):
        if key in sparse:
            sparse[key] = overrides.pop(key)
    data.update(overrides)
    data["sparse"] = sparse
    return ModelConfig.from_dict(data)
