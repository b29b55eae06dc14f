"""SparseAttention(variant="nsa"): NSA's three branches as the sparse mode, trainable with `sparsa train`."""
import torch

from sparsa.config import preset
from sparsa.models import SparsaLM
from sparsa.train import TrainConfig, train
from sparsa.checkpoint import load_model
from tests.helpers import assert_same_step, loss_and_grads


def test_nsa_variant_forward_backward():
    torch.manual_seed(0)
    config = preset("tiny", variant="nsa")
    assert (config.nsa_compress_length, config.nsa_compress_stride, config.nsa_window) == (8, 4, 128)
    model = SparsaLM(config)
    tokens = torch.randint(0, 256, (1, 96))
    full = model(tokens, mode="full").logits
    out = model(tokens, targets=tokens, mode="sparse", align=True)
    assert torch.isfinite(out.loss) and (out.logits - full).abs().max() > 1e-6
    out.loss.backward()
    nsa = model.layers[0].attn.nsa
    for name, p in nsa.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_nsa_block_size_override_rederives_geometry():
    config = preset("tiny", variant="nsa", block_size=32)
    assert (config.nsa_compress_length, config.nsa_compress_stride, config.nsa_window) == (16, 8, 256)


def test_train_nsa_variant_and_reload(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "n"), preset="tiny", method="sparse", variant="nsa", steps=2, batch_size=1,
                      seq_len=64, eval_every=2, eval_batches=1, save_every=2, progress=False, warmup_steps=1)
    train(cfg)
    model, _ = load_model(tmp_path / "n")
    assert model.config.variant == "nsa" and model.layers[0].attn.nsa is not None


def test_nsa_step_is_the_same_on_the_chunked_cpu_paths(monkeypatch):
    """Loss and every gradient of the NSA variant with its compressed / window branches in query chunks
    (compress/chunked.py) and the selected branch on blockwise.py equal those of the one-piece references."""
    from sparsa.ops.compress import chunked
    from sparsa.ops.sparse_attn import blockwise

    tokens = torch.randint(0, 256, (1, 160), generator=torch.Generator().manual_seed(3))
    results = []
    for dense in (True, False):
        monkeypatch.setattr(chunked, "prefers_dense", lambda *a, dense=dense: dense)
        monkeypatch.setattr(blockwise, "prefers_dense", lambda *a, dense=dense, **k: dense)
        monkeypatch.setattr(chunked, "MIN_ROWS", 24)
        monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 1)  # 24-row chunks: the window (128) spans several
        torch.manual_seed(0)
        model = SparsaLM(preset("tiny", variant="nsa")).double()
        results.append(loss_and_grads(model, tokens, targets=tokens, mode="sparse", align=True))
    assert_same_step(*results)
