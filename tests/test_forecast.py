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
