"""SparDA forecasts: lookahead selection semantics, model integration, checkpoints, distillation."""
import math

import pytest
import torch

import sparsa
from sparsa.checkpoint import load_model, save_model
from sparsa.config import preset
from sparsa.layers.forecast import Forecast, forecast_select, forecast_select_from_keys
from sparsa.layers.rope import rope_cos_sin, rope_frequencies
from sparsa.models import SparsaLM


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return SparsaLM(preset("tiny", **kw))


def brute_force_select(f, kbar, offset, block_size, topk, init_blocks, local_blocks):
    """Row by row, straight from the contract."""
    batch, seqlen, n_heads, _ = f.shape
    out = torch.full((batch, seqlen, n_heads, topk), -1, dtype=torch.int32)
    for b in range(batch):
        for i in range(seqlen):
            cur = (offset + i) // block_size
            for g in range(n_heads):
                forced = {c for c in range(cur + 1) if c < init_blocks or c > cur - local_blocks}
                scored = sorted(((float(f[b, i, g].double() @ kbar[b, c, g].double()), c) for c in range(cur)
                                 if c not in forced), reverse=True)
                chosen = sorted(forced)  # at most init + local <= topk blocks
                chosen = sorted(chosen + [c for _, c in scored[: topk - len(chosen)]])
                out[b, i, g, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


@pytest.mark.parametrize("init_blocks,local_blocks,topk", [(0, 1, 3), (1, 2, 4), (2, 1, 6)])
def test_forecast_select_matches_brute_force(init_blocks, local_blocks, topk):
    torch.manual_seed(1)
    bs, seqlen = 4, 37
    f = torch.randn(2, seqlen, 2, 8, dtype=torch.float64)
    kbar = torch.randn(2, seqlen // bs, 2, 8, dtype=torch.float64)
    got = forecast_select(f, kbar, block_size=bs, topk=topk, init_blocks=init_blocks, local_blocks=local_blocks)
    want = brute_force_select(f, kbar, 0, bs, topk, init_blocks, local_blocks)
    assert got.dtype == torch.int32 and got.shape == (2, seqlen, 2, topk)
    assert torch.equal(got, want)
    # invariants: ascending valid prefix, -1 padding, causal, forced blocks present
    pos = torch.arange(seqlen)
    cur = (pos // bs)[None, :, None, None]
    valid = got >= 0
    assert (got[valid.logical_not()] == -1).all()
    assert (valid[..., :-1] | ~valid[..., 1:]).all()  # -1 only on the right
    assert ((got[..., 1:] > got[..., :-1]) | ~valid[..., 1:]).all()
    assert (torch.where(valid, got, torch.zeros_like(got)) <= cur).all()
    assert ((got == cur).any(-1)).all()  # own block always selected


def test_forecast_select_ignores_future_blocks_and_decodes_with_offset():
    torch.manual_seed(2)
    bs, seqlen = 8, 70
    f = torch.randn(1, seqlen, 2, 16)
    kbar = torch.randn(1, seqlen // bs, 2, 16)
    full = forecast_select(f, kbar, block_size=bs, topk=4, init_blocks=1)
    # changing blocks that are not in any row's past changes nothing for earlier rows
    kbar2 = kbar.clone()
    kbar2[:, 5:] = 100.0
    rows = slice(0, 5 * bs + 1)  # rows whose cur <= 5: block 5 is never a past block for them
    assert torch.equal(forecast_select(f, kbar2, block_size=bs, topk=4, init_blocks=1)[:, rows], full[:, rows])
    # decoding: one row at a time with the absolute position as offset and only the past kbar
    for t in (0, 7, 8, 31, 45, 69):
        n_past = t // bs
        one = forecast_select(f[:, t: t + 1], kbar[:, :n_past], seqlen_offset=t, block_size=bs, topk=4, init_blocks=1)
        assert torch.equal(one[:, 0], full[:, t])
    with pytest.raises(ValueError, match="kbar"):
        forecast_select(f[:, 69:70], kbar[:, :3], seqlen_offset=69, block_size=bs, topk=4)


def test_forecast_select_equals_query_selector_with_one_head_per_group():
    """With G = 1 the softmax is monotone per row, so ranking by f . kbar is SSA's ranking."""
    torch.manual_seed(3)
    q, k = torch.randn(1, 100, 2, 8, dtype=torch.float64), torch.randn(1, 100, 2, 8, dtype=torch.float64)
    for init_blocks, local_blocks in ((0, 1), (1, 2)):
        geometry = dict(block_size=8, topk=4, init_blocks=init_blocks, local_blocks=local_blocks)
        assert torch.equal(forecast_select_from_keys(q, k, **geometry), sparsa.select_blocks(q, k, **geometry))


def test_forecast_select_from_keys_per_document():
    torch.manual_seed(4)
    f, k = torch.randn(1, 90, 2, 8), torch.randn(1, 90, 2, 8)
    cu = torch.tensor([0, 37, 90], dtype=torch.int32)
    geometry = dict(block_size=8, topk=3, init_blocks=1, local_blocks=1)
    packed = forecast_select_from_keys(f, k, cu_seqlens=cu, **geometry)
    assert torch.equal(packed[:, :37], forecast_select_from_keys(f[:, :37], k[:, :37], **geometry))
    assert torch.equal(packed[:, 37:], forecast_select_from_keys(f[:, 37:], k[:, 37:], **geometry))


def test_forecast_select_validation():
    f, kbar = torch.randn(1, 16, 2, 8), torch.randn(1, 2, 2, 8)
    with pytest.raises(ValueError, match="topk"):
        forecast_select(f, kbar, block_size=8, topk=1, init_blocks=1, local_blocks=1)
    with pytest.raises(ValueError, match="kbar"):
        forecast_select(f, torch.randn(1, 2, 3, 8), block_size=8, topk=2)
    with pytest.raises(ValueError, match="seqlen_offset"):
        forecast_select(f, kbar, block_size=8, topk=2, seqlen_offset=-1)
    with pytest.raises(ValueError, match="block_size"):
        forecast_select(f, kbar, block_size=0, topk=2)
    with pytest.raises(ValueError, match="k_next"):
        forecast_select_from_keys(f, torch.randn(1, 15, 2, 8), block_size=8, topk=2)


def test_forecast_module_shapes_and_rope():
    torch.manual_seed(5)
    fc = Forecast(32, 2, 8)
    assert fc.proj.bias is None and fc.proj.weight.shape == (16, 32)
    bound = 1 / math.sqrt(32)
    assert fc.proj.weight.abs().max() <= bound
    u = torch.randn(1, 10, 32)
    pos = torch.arange(10)[None]
    cos, sin = rope_cos_sin(pos, rope_frequencies(8, 10000.0))
    f = fc(u, cos, sin)
    assert f.shape == (1, 10, 2, 8)
    # RoPE is a rotation: norms are those of the raw projection
    raw = fc.proj(u).view(1, 10, 2, 8)
    assert torch.allclose(f.norm(dim=-1), raw.norm(dim=-1), atol=1e-5)
    with pytest.raises(ValueError, match="u"):
        fc(torch.randn(1, 10, 31), cos, sin)


@pytest.mark.parametrize("init", ["random", "query"])
def test_adding_forecasts_changes_no_weight_and_no_query_selector_output(init):
    model = tiny_model()
    tokens = torch.randint(0, 256, (2, 128))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outputs = {mode: model(tokens, mode=mode).logits for mode in ("full", "sparse")}
    aligned = model(tokens, targets=tokens, mode="sparse", align=True)
    model.add_forecasts(init=init)
    assert model.has_forecasts and len(model.forecasts) == model.config.n_layers - 1
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert set(after) - set(before) == {"self_forecast.proj.weight"} | {
        f"forecasts.{i}.proj.weight" for i in range(model.config.n_layers - 1)}
    for mode, logits in outputs.items():
        assert torch.equal(model(tokens, mode=mode).logits, logits)
        assert torch.equal(model(tokens, mode=mode, selector="query").logits, logits)
    again = model(tokens, targets=tokens, mode="sparse", align=True)
    assert torch.equal(again.loss, aligned.loss)
    with pytest.raises(ValueError, match="already"):
        model.add_forecasts()


def test_forecast_selector_runs_end_to_end_and_routes_by_forecasts():
    model = tiny_model(n_layers=3).double()
    tokens = torch.randint(0, 256, (1, 160))
    with pytest.raises(ValueError, match="forecast"):
        model(tokens, mode="sparse", selector="forecast")
    with pytest.raises(ValueError, match="selector"):
        model(tokens, mode="sparse", selector="oracle")
    model.add_forecasts()
    records = [dict() for _ in model.layers]
    for layer, record in zip(model.layers, records):
        layer.attn.record = record
    out = model(tokens, targets=tokens, mode="sparse", selector="forecast")
    for layer in model.layers:
        layer.attn.record = None
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.ce)
    assert len(out.block_indices) == 3
    cos, sin = model.rope(tokens, None, None)
    sc = model.config.sparse
    geometry = dict(block_size=sc.block_size, topk=sc.topk, init_blocks=sc.init_blocks, local_blocks=sc.local_blocks)
    for index, record in enumerate(records):
        fc = model.self_forecast if index == 0 else model.forecasts[index - 1]
        source = records[0 if index == 0 else index - 1]
        f = fc(source["x"], cos, sin)
        assert torch.equal(out.block_indices[index], forecast_select_from_keys(f, record["k"], **geometry))
    # SSA training with the forecast selector routing the sparse branch also runs
    aligned = model(tokens, targets=tokens, mode="full", align=True, selector="forecast")
    assert torch.equal(aligned.logits, model(tokens, mode="full").logits) and torch.isfinite(aligned.align)
    # the forecast selector differs from the query selector in general but both are valid selections
    query = model(tokens, mode="sparse").block_indices
    assert any(not torch.equal(a, b) for a, b in zip(query, out.block_indices))
    # when top-k covers the context both selectors reduce to full attention
    short = tokens[:, :64]
    full = model(short, mode="full").logits
    assert (model(short, mode="sparse", selector="forecast", topk=4).logits - full).abs().max() < 1e-10
    # packed documents: each document routed on its own
    cu = torch.tensor([0, 70, 160], dtype=torch.int32)
    packed = model(tokens, mode="sparse", selector="forecast", cu_seqlens=cu).logits
    alone = model(tokens[:, 70:], mode="sparse", selector="forecast").logits
    assert (packed[:, 70:] - alone).abs().max() < 1e-10


def test_checkpoint_round_trip_with_forecasts(tmp_path):
    model = tiny_model()
    model.add_forecasts()
    with torch.no_grad():
        for p in model.forecast_parameters():
            p.normal_()
    save_model(tmp_path, model, model.config, extra={"method": "ssa", **model.checkpoint_meta()})
    loaded, meta = load_model(tmp_path)
    assert meta["forecast"] is True and loaded.has_forecasts
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    tokens = torch.randint(0, 256, (1, 128))
    assert torch.equal(model(tokens, mode="sparse", selector="forecast").logits,
                       loaded(tokens, mode="sparse", selector="forecast").logits)
    # a checkpoint without the key loads without forecasts; forecast weights without the key fail loudly
    plain = tiny_model()
    save_model(tmp_path / "plain", plain, plain.config, extra=plain.checkpoint_meta())
    assert not load_model(tmp_path / "plain")[0].has_forecasts
    save_model(tmp_path / "bad", model, model.config)
    with pytest.raises(ValueError, match="unexpected"):
        load_model(tmp_path / "bad")


# ------------------------------------------------------------------------------ distillation
from sparsa.data import random_batch  # noqa: E402
from sparsa.train.forecast import (  # noqa: E402
    DistillConfig, distill, distill_step, reference_block_attention_kl, topk_rest_kl,
)
from sparsa.train.ssa import load_streams, read_metrics  # noqa: E402


@pytest.fixture(scope="module")
def sharp_checkpoint(tmp_path_factory):
    """A tiny random model with peaked attention (scaled q/k weights) and a small corpus."""
    import random

    root = tmp_path_factory.mktemp("forecast")
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "omega", "sigma", "theta", "\n"]
    (root / "data.txt").write_text(" ".join(rng.choice(words) for _ in range(6000)))
    model = tiny_model(seed=3)
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.q_proj.weight.mul_(12.0)
            layer.attn.k_proj.weight.mul_(12.0)
    save_model(root / "ck", model, model.config, extra={"method": "ssa"})
    return root


def distill_cfg(root, out, **kw):
    base = dict(checkpoint=str(root / "ck"), out=str(out), steps=4, batch_size=1, seq_len=64, eval_every=100,
                eval_batches=1, save_every=100, data=str(root / "data.txt"), progress=False, init="random", lr=5e-3)
    base.update(kw)
    return DistillConfig(**base)


def fixed_batch_losses(model, cfg, seed):
    train_stream, _ = load_streams(cfg.data)
    batch = random_batch(train_stream, cfg.batch_size, cfg.seq_len, seed)
    for p in model.forecast_parameters():
        p.requires_grad_(True)
    losses = distill_step(model, batch.tokens, batch.cu_seqlens, cfg)
    model.zero_grad(set_to_none=True)
    return losses


def test_distill_lowers_the_loss_and_keeps_the_backbone(sharp_checkpoint, tmp_path):
    cfg = distill_cfg(sharp_checkpoint, tmp_path / "d", steps=6)
    distill(cfg)
    first = [r for r in read_metrics(tmp_path / "d" / "forecast_metrics.jsonl") if r["kind"] == "train"][0]
    trained, meta = load_model(tmp_path / "d")
    assert meta["forecast"] is True and meta["method"] == "ssa" and trained.has_forecasts
    after = fixed_batch_losses(trained, cfg, [cfg.seed, 13, 0, 0])  # step 0's batch
    assert sum(after) < 0.9 * sum(first["layer_loss"]), (after, first["layer_loss"])
    original, _ = load_model(sharp_checkpoint / "ck")
    for name, value in original.state_dict().items():
        assert torch.equal(trained.state_dict()[name], value), name
    tokens = torch.randint(0, 256, (1, 64))
    assert torch.equal(trained(tokens, mode="sparse").logits, original(tokens, mode="sparse").logits)
    assert torch.isfinite(trained(tokens, mode="sparse", selector="forecast").logits).all()
    with pytest.raises(ValueError, match="resume"):
        distill(cfg)


def test_distill_resume_equals_uninterrupted(sharp_checkpoint, tmp_path):
    distill(distill_cfg(sharp_checkpoint, tmp_path / "a", steps=4, grad_accum=2, eval_every=2, save_every=2))
    distill(distill_cfg(sharp_checkpoint, tmp_path / "b", steps=4, grad_accum=2, eval_every=2, save_every=2,
                        stop_after=2))
    distill(distill_cfg(sharp_checkpoint, tmp_path / "b", steps=4, grad_accum=2, eval_every=2, save_every=2,
                        resume=True))
    ra, rb = (read_metrics(tmp_path / x / "forecast_metrics.jsonl") for x in ("a", "b"))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731
    assert strip(ra) == strip(rb) and len([r for r in ra if r["kind"] == "train"]) == 4
    ma, mb = load_model(tmp_path / "a")[0], load_model(tmp_path / "b")[0]
    for (name, a), (_, b) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert torch.equal(a, b), name


def test_layerwise_graphs_span_one_layer_and_reach_only_forecasts(sharp_checkpoint):
    """Memory flat in depth by design: each layer's loss only reaches its own predictor."""
    model = tiny_model(seed=1, n_layers=3)
    model.add_forecasts(init="random")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.forecast_parameters():
        p.requires_grad_(True)
    cfg = distill_cfg(sharp_checkpoint, sharp_checkpoint / "unused")
    predictors = [model.self_forecast, model.forecasts[0], model.forecasts[1]]
    snapshots = []

    def on_layer(index):
        grads = [None if p.proj.weight.grad is None else p.proj.weight.grad.clone() for p in predictors]
        snapshots.append(grads)

    tokens = torch.randint(0, 256, (1, 96))
    distill_step(model, tokens, None, cfg, on_layer=on_layer)
    for index, grads in enumerate(snapshots):
        for j, g in enumerate(grads):
            if j <= index:
                assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, (index, j)
            else:
                assert g is None, (index, j)  # later predictors untouched so far
        if index > 0:  # this layer's loss left the earlier predictors' gradients unchanged
            for j in range(index):
                assert torch.equal(grads[j], snapshots[index - 1][j])
    trainable = {id(p) for p in model.forecast_parameters()}
    for name, p in model.named_parameters():
        if id(p) not in trainable:
            assert p.grad is None, name


def test_reference_block_kl_matches_streamkl_and_topk_rest_runs():
    torch.manual_seed(6)
    q, k = torch.randn(1, 50, 4, 8, dtype=torch.float64) * 2, torch.randn(1, 50, 2, 8, dtype=torch.float64) * 2
    f = torch.randn(1, 50, 2, 8, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 21, 50], dtype=torch.int32)
    kbar = sparsa.block_keys(k, 4, cu)
    ref = reference_block_attention_kl(q, k, f, kbar, block_size=4, scale_s=0.3, cu_seqlens=cu)
    try:
        from sparsa.ops.kl import block_attention_kl
    except (ImportError, AttributeError):
        block_attention_kl = None
    if block_attention_kl is not None:
        other = block_attention_kl(q, k, f, kbar, block_size=4, scale_s=0.3, cu_seqlens=cu)
        assert torch.allclose(ref, other, rtol=1e-9, atol=1e-12)
        g1, = torch.autograd.grad(ref, f)
        g2, = torch.autograd.grad(other, f)
        assert torch.allclose(g1, g2, rtol=1e-7, atol=1e-12)
    assert ref > 0
    idx = sparsa.select_blocks(q, k, block_size=4, topk=4, init_blocks=1, cu_seqlens=cu)
    loss = topk_rest_kl(q, k, f, kbar, idx, block_size=4, init_blocks=1, local_blocks=1, scale_s=0.3, cu_seqlens=cu)
    assert torch.isfinite(loss) and loss > 0
    (g,) = torch.autograd.grad(loss, f)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_cli_distill_and_forecast_eval(sharp_checkpoint, tmp_path, capsys):
    from sparsa.cli import main

    out = tmp_path / "cli"
    data = str(sharp_checkpoint / "data.txt")
    assert main(["distill-forecast", str(sharp_checkpoint / "ck"), "--out", str(out), "--steps", "2",
                 "--batch-size", "1", "--seq-len", "64", "--data", data, "--no-progress", "--target", "topk_rest"]) == 0
    capsys.readouterr()
    assert main(["forecast-eval", str(out), "--data", data, "--seq-len", "128", "--max-batches", "1",
                 "--diag-windows", "1", "--no-passkey", "--json"]) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    assert len(result["layers"]) == 2 and set(result["bpb"]) == {"full", "query", "forecast"}
    assert 0.0 <= result["layers"][1]["recall"] <= 1.0


def test_evaluate_checkpoint_with_forecast_selector(sharp_checkpoint, tmp_path):
    from sparsa.eval import EvalConfig, evaluate_checkpoint

    data = str(sharp_checkpoint / "data.txt")
    with pytest.raises(ValueError, match="forecast"):
        evaluate_checkpoint(EvalConfig(checkpoint=str(sharp_checkpoint / "ck"), data=data, selector="forecast"))
    distill(distill_cfg(sharp_checkpoint, tmp_path / "e", steps=1))
    common = dict(checkpoint=str(tmp_path / "e"), data=data, seq_len=128, max_batches=1, topk_sweep=(4,),
                  diag_windows=1, passkey_lengths=(120,), passkey_depths=(0.5,), figure=False)
    query = evaluate_checkpoint(EvalConfig(**common))
    forecast = evaluate_checkpoint(EvalConfig(selector="forecast", **common))
    assert query["bpb"]["full"] == forecast["bpb"]["full"]
    assert forecast["selector"] == "forecast"
    assert query["forecast"]["bpb"]["query"] == query["bpb"]["sparse"]
    assert forecast["forecast"]["bpb"]["forecast"] == forecast["bpb"]["sparse"]
    assert set(query["forecast"]["passkey"]) == {"query", "forecast"}
    with pytest.raises(ValueError, match="selector"):
        evaluate_checkpoint(EvalConfig(selector="oracle", **common))
