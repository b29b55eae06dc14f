"""Training a checkpoint that already carries forecasts keeps them (and does not train them)."""
import torch

from sparsa.checkpoint import load_model, save_model
from sparsa.train import TrainConfig, train


def test_train_resume_keeps_forecasts(tmp_path):
    cfg = dict(out=str(tmp_path / "r"), preset="tiny", method="sparse", steps=2, batch_size=1, seq_len=64,
               eval_every=100, eval_batches=1, save_every=1, progress=False, warmup_steps=1)
    train(TrainConfig(**cfg, stop_after=1))
    model, meta = load_model(tmp_path / "r")
    model.add_forecasts()
    save_model(tmp_path / "r", model, model.config, extra={k: v for k, v in meta.items() if k != "model"}
               | model.checkpoint_meta())
    before = [p.detach().clone() for p in model.forecast_parameters()]
    # the optimizer state of step 1 was saved without forecasts: resume must still load it
    train(TrainConfig(**cfg, resume=True))
    resumed, meta = load_model(tmp_path / "r")
    assert meta.get("forecast") is True and resumed.has_forecasts
    for a, b in zip(before, resumed.forecast_parameters()):
        assert torch.equal(a, b)
