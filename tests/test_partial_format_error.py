"""scripts/partial_format_error.py: the error model of the KV-outer partials' storage format (CPU, float64)."""
import pytest
import torch

from scripts.partial_format_error import round_rows, run


def test_formats_order_as_their_precision():
    """bf16 partials (what the kernels store) stay within issue 3's 2x of the PyTorch reference; int8 rows with a
    per-row scale cost about three times bf16's error; every format is at least the final rounding."""
    r = run(1024, 2, torch.bfloat16, None, seed=3)
    assert r["final_rounding_only"] <= r["bf16"] < 2 * r["pytorch_reference"]
    assert r["int8"] > 2 * r["bf16"]
    assert r["int12"] < r["int10"] < r["int8"]


def test_int_rows_keep_their_absmax_and_reject_nothing_silently():
    o = torch.randn(3, 128, dtype=torch.float64)
    back = round_rows(o, "int8")
    assert torch.allclose(back.abs().amax(-1), o.abs().amax(-1), rtol=1e-6)
    assert ((back - o).abs() <= o.abs().amax(-1, keepdim=True) / 127 / 2 + 1e-12).all()
    with pytest.raises(ValueError):
        round_rows(o, "intx")
