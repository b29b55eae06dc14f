"""Output allocation of the Triton ops: uninitialised by default, NaN-poisoned for tests."""
import os

import torch

from sparsa.ops import _alloc


def test_poisoned_outputs_are_nan(monkeypatch):
    monkeypatch.setattr(_alloc, "POISON_OUTPUTS", True)
    x = _alloc.new_output((3, 4), torch.float32, "cpu")
    assert x.shape == (3, 4) and torch.isnan(x).all()
    y = _alloc.new_output_like(torch.zeros(2, 5, dtype=torch.float16))
    assert y.dtype == torch.float16 and torch.isnan(y).all()


def test_unpoisoned_outputs_have_the_requested_layout(monkeypatch):
    monkeypatch.setattr(_alloc, "POISON_OUTPUTS", False)
    x = _alloc.new_output((2, 3, 4), torch.bfloat16, "cpu")
    assert x.shape == (2, 3, 4) and x.dtype == torch.bfloat16 and x.is_contiguous()


def test_interpreter_runs_poison_outputs():
    if os.environ.get("TRITON_INTERPRET") == "1":  # how CI runs the kernel tests
        assert _alloc.POISON_OUTPUTS
