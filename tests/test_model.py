"""Model: modes, SSA alignment gradients, Theorem 1, packed documents."""
import pytest
import torch

import sparsa
from sparsa.config import ModelConfig, SparseConfig, preset
from sparsa.eval.metrics import attention_diagnostics
from sparsa.layers.attention import alignment_loss
from sparsa.models import SparsaLM
from tests.helpers import assert_same_step, loss_and_grads


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return SparsaLM(preset("tiny", **kw))


def test_alignment_loss_sends_gradient_to_each_branch_through_its_own_term():
    h_full = torch.randn(2, 5, 3, 4, requires_grad=True)
    h_sparse = torch.randn(2, 5, 3, 4, requires_grad=True)
    loss = alignment_loss(h_full, h_sparse)
    g_full, g_sparse = torch.autograd.grad(loss, (h_full, h_sparse))
    # each term alone
    term_full = torch.nn.functional.smooth_l1_loss(h_full, h_sparse.detach())
    term_sparse = torch.nn.functional.smooth_l1_loss(h_sparse, h_full.detach())
    assert torch.allclose(g_full, torch.autograd.grad(term_full, h_full)[0])
    assert torch.allclose(g_sparse, torch.autograd.grad(term_sparse, h_sparse)[0])
    assert torch.allclose(loss, term_full + term_sparse)


def test_modes_equal_when_topk_covers_context():
    model = tiny_model().double()
    tokens = torch.randint(0, 256, (2, 64))
    full = model(tokens, mode="full").logits
    sparse = model(tokens, mode="sparse", topk=4).logits  # 4 blocks of 16 = whole context
    assert (full - sparse).abs().max() < 1e-10
    partial = model(tokens, mode="sparse", topk=1).logits
    assert (full - partial).abs().max() > 1e-6


def test_aux_branch_does_not_feed_next_layer():
    model = tiny_model()
    tokens = torch.randint(0, 256, (1, 128))
    plain = model(tokens, mode="sparse").logits
    aligned = model(tokens, mode="sparse", align=True)
    assert torch.equal(plain, aligned.logits)
    assert aligned.align is not None and aligned.align.item() > 0


def test_ssa_loss_backward_reaches_all_attention_weights():
    model = tiny_model()
    tokens = torch.randint(0, 256, (1, 128))
    out = model(tokens, targets=tokens, mode="full", align=True)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_packed_documents_equal_separate_runs():
    model = tiny_model().double()
    a, b = torch.randint(0, 256, (1, 40)), torch.randint(0, 256, (1, 50))
    cu = torch.tensor([0, 40, 90], dtype=torch.int32)
    for mode in ("full", "sparse"):
        packed = model(torch.cat([a, b], 1), mode=mode, cu_seqlens=cu).logits
        assert (packed[:, :40] - model(a, mode=mode).logits).abs().max() < 1e-10
        assert (packed[:, 40:] - model(b, mode=mode).logits).abs().max() < 1e-10


@pytest.mark.parametrize("packed", [False, True])
def test_ssa_step_is_the_same_on_the_blockwise_cpu_path(monkeypatch, packed):
    """The SSA loss and every gradient of the model with sparse attention on blockwise.py (the CPU path for long
    sequences) equal those with the dense reference."""
    from sparsa.ops.sparse_attn import blockwise

    tokens = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(5))
    cu = torch.tensor([0, 30, 96], dtype=torch.int32) if packed else None
    results = []
    for dense in (True, False):
        monkeypatch.setattr(blockwise, "prefers_dense", lambda *a, dense=dense, **k: dense)
        monkeypatch.setattr(blockwise, "CHUNK_ELEMENTS", 5000)  # several chunks
        results.append(loss_and_grads(tiny_model().double(), tokens, targets=tokens, mode="full", align=True,
                                      cu_seqlens=cu))
    assert_same_step(*results)


def test_theorem1_identity_on_model_activations():
    model = tiny_model().double()
    record = {}
    model.layers[0].attn.record = record
    model(torch.randint(0, 256, (1, 128)), mode="full")
    q, k, v = record["q"], record["k"], record["v"]
    idx = model.layers[0].attn.select(q, k)
    diag = attention_diagnostics(q, k, v, idx, 16, min_position=64)
    assert diag["theorem1_residual"] < 1e-12
    assert 0.0 < diag["attn_sparsity"] < 1.0
    assert abs(diag["delta"] + diag["attn_sparsity"] - 1.0) < 1e-12


def test_theorem1_detects_a_wrong_sparse_attention():
    """The check is meaningful: a sparse output with a different scale breaks the identity."""
    q = torch.randn(1, 64, 2, 8, dtype=torch.float64)
    k = torch.randn(1, 64, 1, 8, dtype=torch.float64)
    v = torch.randn(1, 64, 1, 8, dtype=torch.float64)
    idx = sparsa.select_blocks(q, k, block_size=8, topk=2)
    good = attention_diagnostics(q, k, v, idx, 8, min_position=16)["theorem1_residual"]
    import sparsa.eval.metrics as metrics
    original = metrics.reference_sparse_attention
    metrics.reference_sparse_attention = lambda *a, **kw: original(*a, **{**kw, "scale": 0.5})
    try:
        bad = attention_diagnostics(q, k, v, idx, 8, min_position=16)["theorem1_residual"]
    finally:
        metrics.reference_sparse_attention = original
    assert good < 1e-12 and bad > 1e-3


def test_config_validation():
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(n_heads=3, n_kv_heads=2)
    with pytest.raises(ValueError, match="topk"):
        SparseConfig(topk=1, init_blocks=1, local_blocks=1)
    with pytest.raises(ValueError, match="preset"):
        preset("huge")
    with pytest.raises(ValueError, match="mode"):
        tiny_model()(torch.zeros(1, 4, dtype=torch.long), mode="dense")
    with pytest.raises(ValueError, match="tokens"):
        tiny_model()(torch.zeros(1, 0, dtype=torch.long))
