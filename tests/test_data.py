"""Data pipeline: split, packing with document boundaries, checkpoint tokenizers, bytes per token."""
import math

import numpy as np
import pytest
import torch

from sparsa.data import (
    ByteTokenizer,
    TokenStream,
    pack_windows,
    split_documents,
    tokenizer_for_checkpoint,
)


class PairTokenizer:
    """Two bytes per token (a stand-in for a subword tokenizer)."""

    def encode(self, text):
        data = text.encode("utf-8")
        return [data[i] * 256 + (data[i + 1] if i + 1 < len(data) else 0) for i in range(0, len(data), 2)]


def test_split_is_deterministic_and_disjoint():
    docs = [(f"d{i}", f"text {i}") for i in range(25)]
    train, val = split_documents(docs)
    assert val == ["text 9", "text 19"] and len(train) == 23
    train1, val1 = split_documents([("one", "a" * 100)])
    assert len(train1[0]) == 90 and len(val1[0]) == 10


def test_pack_windows_splits_documents_and_masks_cross_document_targets():
    stream = TokenStream.from_texts(["abcde", "fghij"], ByteTokenizer())
    batch = pack_windows(stream, [2, 0], seq_len=4)
    # row 0 = "cdef": a new document starts at 'f' (position 3); row 1 = "abcd"
    assert batch.cu_seqlens.tolist() == [0, 3, 4, 8]
    assert batch.targets[0, 2].item() == -100  # 'e' -> 'f' crosses the boundary
    assert batch.targets[0, 0].item() == ord("d")


def test_bytes_per_token_and_checkpoint_tokenizer(tmp_path):
    assert TokenStream.from_texts(["hello"], ByteTokenizer()).bytes_per_token == 1.0
    stream = TokenStream.from_texts(["abcdefgh"], PairTokenizer())
    assert stream.bytes_per_token == 2.0 and len(stream) == 4
    assert isinstance(tokenizer_for_checkpoint(tmp_path, 256), ByteTokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        tokenizer_for_checkpoint(tmp_path, 49152)


def test_bits_per_byte_uses_bytes_per_token():
    from sparsa.config import preset
    from sparsa.models import SparsaLM
    from sparsa.train.ssa import evaluate_bpb

    torch.manual_seed(0)
    model = SparsaLM(preset("tiny"))
    stream = TokenStream(np.random.default_rng(0).integers(0, 256, 600), np.array([0]), 1.0)
    per_token = evaluate_bpb(model, stream, 64, 2, 2, "full", torch.device("cpu"))
    stream.bytes_per_token = 4.0
    assert math.isclose(evaluate_bpb(model, stream, 64, 2, 2, "full", torch.device("cpu")), per_token / 4.0, rel_tol=1e-9)
