"""Engine correctness on CPU (float32): every mode, against SparsaLM's forward and each other."""
import os

import pytest
import torch
import torch.nn as nn

from sparsa.config import ModelConfig, SparseConfig
from sparsa.layers.rope import apply_rope
from sparsa.models.llama import SparsaLM
from sparsa.ops import block_keys
from sparsa.serve import Engine
from sparsa.serve.attend import block_attention_reference, block_attention_triton
from sparsa.serve.gather import gather_blocks, write_tokens
from sparsa.serve.select import slot_diff

BS, TOPK = 8, 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: one intra-op thread avoids oversubscription on a shared 2-core CI box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_config(**kw):
    base = dict(vocab_size=64, n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128,
                sparse=SparseConfig(block_size=BS, topk=TOPK, init_blocks=1, local_blocks=1))
    base.update(kw)
    return ModelConfig(**base)


def _kernels_runnable() -> bool:
    """Triton kernels run here: triton importable and a GPU or the interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


KERNELS_OK = _kernels_runnable()
needs_kernels = pytest.mark.skipif(not KERNELS_OK, reason="needs triton (GPU or interpreter)")


class StandInForecast(nn.Module):
    """Contract stand-in: f = RoPE(W u) [B, T, Hkv, D]."""

    def __init__(self, config):
        super().__init__()
        self.h, self.d = config.n_kv_heads, config.head_dim
        self.proj = nn.Linear(config.d_model, self.h * self.d, bias=False)

    def forward(self, u, cos, sin):
        b, t, _ = u.shape
        return apply_rope(self.proj(u).view(b, t, self.h, self.d), cos, sin)


class ForecastLM(SparsaLM):
    has_forecasts = True

    def __init__(self, config):
        super().__init__(config)
        self.forecasts = nn.ModuleList(StandInForecast(config) for _ in range(config.n_layers - 1))
        self.self_forecast = StandInForecast(config)
        for p in self.parameters():  # larger weights: more varied selections than the 0.02 init
            if p.ndim == 2:
                nn.init.normal_(p, std=0.3)


def make_model(seed=0, forecasts=False, **kw):
    """Larger weights than the 0.02 init: more varied selections. Forecasts: the model's own
    `add_forecasts()` (sparsa.layers.forecast) when present, else the contract stand-in."""
    torch.manual_seed(seed)
    cfg = make_config(**kw)
    if forecasts and not hasattr(SparsaLM, "add_forecasts"):
        return ForecastLM(cfg).eval()
    model = SparsaLM(cfg)
    if forecasts:
        model.add_forecasts()
    for p in model.parameters():
        if p.ndim == 2:
            nn.init.normal_(p, std=0.3)
    return model.eval()


def teacher_forced(engine, prompts, continuations):
    """Per row: logits of the last prompt token, then of every continuation token."""
    out = [engine.prefill(prompts)]
    for i in range(continuations.shape[1]):
        out.append(engine.decode_step(continuations[:, i]))
    return torch.stack(out, dim=1)  # [B, 1 + n, vocab]


def batch_data(seed=1, lengths=(37, 50, 8), n_new=12, vocab=64):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    cont = torch.randint(0, vocab, (len(lengths), n_new), generator=g)
    return prompts, cont


def forward_logits(model, prompt, cont_row, mode):
    seq = torch.tensor(prompt + cont_row.tolist())[None]
    with torch.no_grad():
        return model(seq, mode=mode).logits[0, len(prompt) - 1:]


@pytest.mark.parametrize("mode,model_mode", [("dense", "full"), ("sparse", "sparse")])
def test_decode_matches_full_forward(mode, model_mode):
    model = make_model()
    prompts, cont = batch_data()
    eng = Engine(model, mode=mode, max_batch=3, prefill_chunk=16)
    got = teacher_forced(eng, prompts, cont)
    for b, p in enumerate(prompts):
        ref = forward_logits(model, p, cont[b], model_mode)
        assert torch.allclose(got[b], ref, atol=2e-4, rtol=1e-4), (mode, b, (got[b] - ref).abs().max())


def test_offload_equals_sparse_exactly():
    model = make_model(2)
    prompts, cont = batch_data(3)
    sparse = Engine(model, mode="sparse", max_batch=3, prefill_chunk=16)
    sparse.record = {}
    ref = teacher_forced(sparse, prompts, cont)
    off = Engine(model, mode="offload", max_batch=3, prefill_chunk=16)
    off.record = {}
    got = teacher_forced(off, prompts, cont)
    assert set(off.record) == set(sparse.record)
    assert all(torch.equal(off.record[k], sparse.record[k]) for k in sparse.record)
    assert torch.equal(got, ref)
    c = off.counters()
    assert c["block_lookups"] > 0 and 0 <= c["hit_rate"] <= 1
    assert c["bytes_moved"] == c["block_misses"] * 2 * BS * model.config.head_dim * 4
    # replaying the same selections into offload changes nothing
    off2 = Engine(model, mode="offload", max_batch=3, prefill_chunk=16)
    off2.replay = sparse.record
    assert torch.equal(teacher_forced(off2, prompts, cont), ref)


def test_sparda_equals_sparse_with_its_selections():
    model = make_model(4, forecasts=True)
    prompts, cont = batch_data(5, lengths=(45, 64, 20))
    sparda = Engine(model, mode="sparda", max_batch=3, prefill_chunk=16)
    sparda.record = {}
    got = teacher_forced(sparda, prompts, cont)
    sparse = Engine(model, mode="sparse", max_batch=3, prefill_chunk=16)
    sparse.replay = sparda.record
    sparse.record = {}
    ref = teacher_forced(sparse, prompts, cont)
    assert set(sparse.record) == set(sparda.record)
    assert torch.equal(got, ref)
    c = sparda.counters()
    assert c["block_lookups"] > 0 and c["block_hits"] > 0  # the slot diff keeps resident blocks


def test_sparda_decode_matches_forecast_forward():
    """sparda decode == SparsaLM(mode="sparse", selector="forecast") position by position."""
    if not hasattr(SparsaLM, "add_forecasts"):
        pytest.skip("SparsaLM has no forecast selector yet")
    model = make_model(12, forecasts=True)
    prompts, cont = batch_data(13, lengths=(41, 70, 9))
    eng = Engine(model, mode="sparda", max_batch=3, prefill_chunk=16)
    got = teacher_forced(eng, prompts, cont)
    for b, p in enumerate(prompts):
        seq = torch.tensor(p + cont[b].tolist())[None]
        with torch.no_grad():
            ref = model(seq, mode="sparse", selector="forecast").logits[0, len(p) - 1:]
        assert torch.allclose(got[b], ref, atol=2e-4, rtol=1e-4), (b, (got[b] - ref).abs().max())


def reference_forecast_select(f, kbar, seqlen, topk, init_blocks, local_blocks):
    """Contract semantics: raw dot over complete past blocks, forced init/local, top-k ascending, -1 padded."""
    try:
        from sparsa.layers.forecast import forecast_select
    except ImportError:
        forecast_select = None
    if forecast_select is not None:
        return forecast_select(f, kbar, block_size=BS, topk=topk, init_blocks=init_blocks, local_blocks=local_blocks)
    b, t, h, d = f.shape
    n_all = -(-seqlen // BS)
    z = torch.full((b, t, h, n_all), float("-inf"))
    nc = kbar.shape[1]
    z[..., :nc] = torch.einsum("bthd,bchd->bthc", f.float(), kbar.float())
    out = torch.full((b, t, h, topk), -1, dtype=torch.int32)
    for ti in range(t):
        cur = ti // BS
        for hi in range(h):
            s = z[0, ti, hi].clone()
            s[cur:] = float("-inf")
            for c in range(n_all):
                if (cur - local_blocks < c <= cur) or (c < init_blocks and c <= cur):
                    s[c] = float("inf")
            order = [c for c in torch.argsort(s, descending=True, stable=True).tolist() if s[c] > float("-inf")][:topk]
            order.sort()
            out[0, ti, hi, : len(order)] = torch.tensor(order, dtype=torch.int32)
    return out


def test_sparda_prefill_selection_follows_forecast_contract():
    model = make_model(6, forecasts=True)
    prompt = torch.randint(0, 64, (52,), generator=torch.Generator().manual_seed(7)).tolist()
    eng = Engine(model, mode="sparda", max_batch=1, prefill_chunk=16)
    eng.record = {}
    eng.prefill([prompt])
    for layer in model.layers:
        layer.attn.record = {}
    seq = torch.tensor(prompt)[None]
    with torch.no_grad():
        # the forecasts' inputs are the normalized inputs of each layer in sparse mode with the same selections
        cos, sin = model.rope(seq, None, None)
        x = model.embed(seq)
        u_prev = None
        for i, layer in enumerate(model.layers):
            sel_i = torch.cat([eng.record[("prefill", 0, i, s)] for s in range(0, 52, 16)], dim=0)[None]
            u = layer.attn_norm(x)
            f = (model.self_forecast if i == 0 else model.forecasts[i - 1])(u if i == 0 else u_prev, cos, sin)
            att = layer.attn(u, cos, sin, mode="sparse", block_indices=sel_i)
            kbar = block_keys(layer.attn.record["k"], BS)
            ref = reference_forecast_select(f, kbar, 52, TOPK, 1, 1)
            assert torch.equal(ref, sel_i), i
            u_prev = u
            x = x + att.out
            x = x + layer.mlp(layer.mlp_norm(x))
    for layer in model.layers:
        layer.attn.record = None


def test_generation_api_sampling_and_stops():
    model = make_model(8)
    prompts, _ = batch_data(9, lengths=(10, 30))
    outs = {}
    for mode in ("dense", "sparse", "offload"):
        eng = Engine(model, mode=mode, max_batch=2, prefill_chunk=16, check_every=4)
        outs[mode] = eng.generate(prompts, max_new_tokens=10).tokens
        assert [len(r) for r in outs[mode]] == [10, 10]
        a = eng.generate(prompts, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3).tokens
        b = eng.generate(prompts, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3).tokens
        assert a == b
        # a tiny nucleus is greedy decoding
        assert eng.generate(prompts, max_new_tokens=10, temperature=0.7, top_p=1e-6, seed=1).tokens == outs[mode]
        stop = outs[mode][0][3]
        r = eng.generate(prompts, max_new_tokens=10, stop_tokens=[stop])
        assert r.tokens[0][-1] == stop and stop not in r.tokens[0][:-1]
    assert outs["sparse"] == outs["offload"]


def test_bad_requests_raise_clear_errors():
    model = make_model()
    eng = Engine(model, mode="offload", max_batch=2)
    with pytest.raises(ValueError, match="exceed the context"):
        eng.generate([[1] * 120], max_new_tokens=20)
    with pytest.raises(ValueError, match="empty"):
        eng.generate([[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="capacity"):
        eng.generate([[1], [2], [3]], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        eng.generate([[1]], max_new_tokens=2, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        eng.generate([[1]], max_new_tokens=2, top_p=0)
    with pytest.raises(ValueError, match="mode"):
        Engine(model, mode="paged")
    with pytest.raises(ValueError, match="forecast"):
        Engine(model, mode="sparda")
    with pytest.raises(ValueError, match="not enough memory"):
        Engine(model, mode="sparse", max_batch=2, device_memory_limit=1000)
    with pytest.raises(ValueError, match="not enough memory"):
        Engine(model, mode="offload", max_batch=2, host_memory_limit=1000)


@pytest.mark.parametrize("method", ["torch", "kernel"])
def test_slot_diff_keeps_resident_blocks(method):
    if method == "kernel" and not KERNELS_OK:
        pytest.skip("needs triton (GPU or interpreter)")
    g = torch.Generator().manual_seed(0)
    b, h, k = 3, 2, 6
    bm = torch.full((b, h, k), -1, dtype=torch.long)
    cur = torch.tensor([20, 20, 20])
    for _ in range(20):
        sel = torch.stack([torch.randperm(20, generator=g)[:k] for _ in range(b * h)]).view(b, h, k)
        sel[..., -1] = -1
        sel[0, 0, 0] = 20  # the current block: never in a slot
        sel = torch.sort(torch.where(sel < 0, 99, sel), dim=-1).values
        sel = torch.where(sel == 99, -1, sel)
        dev = "cuda" if method == "kernel" and torch.cuda.is_available() else "cpu"
        out = slot_diff(sel.to(dev), bm.to(dev), cur.to(dev), method=method)
        new_map, load, slot_of, hits, misses = (t.cpu() for t in out)
        ref = slot_diff(sel, bm, cur, method="torch")
        for got, want in zip((new_map, load, slot_of, hits, misses), ref):
            assert torch.equal(got, want)
        for bi in range(b):
            for hi in range(h):
                want = {x for x in sel[bi, hi].tolist() if x >= 0 and x != 20}
                held = {x for x in new_map[bi, hi].tolist() if x >= 0}
                assert want <= held
                before = bm[bi, hi].tolist()
                for j, blk in enumerate(sel[bi, hi].tolist()):
                    if blk < 0 or blk == 20:
                        assert slot_of[bi, hi, j] == -1
                        continue
                    s = int(slot_of[bi, hi, j])
                    assert new_map[bi, hi, s] == blk
                    assert (load[bi, hi, s] == blk) == (blk not in before)
                assert int(hits[bi, hi]) == len(want & set(before))
                assert int(misses[bi, hi]) == len(want - set(before))
        bm = new_map


def test_gather_and_write_paths_agree():
    g = torch.Generator().manual_seed(0)
    host_k, host_v = torch.randn(2, 3, 10, 8, 16, generator=g), torch.randn(2, 3, 10, 8, 16, generator=g)
    load = torch.randint(-1, 10, (2, 3, 4), generator=g)
    ref_k, ref_v = torch.full((2, 3, 4, 8, 16), float("nan")), torch.full((2, 3, 4, 8, 16), float("nan"))
    gather_blocks(host_k, host_v, ref_k, ref_v, load, method="index")
    for b in range(2):
        for h in range(3):
            for s in range(4):
                if load[b, h, s] >= 0:
                    assert torch.equal(ref_k[b, h, s], host_k[b, h, load[b, h, s]])
                    assert torch.equal(ref_v[b, h, s], host_v[b, h, load[b, h, s]])
                else:
                    assert torch.isnan(ref_k[b, h, s]).all()
    staged_k, staged_v = torch.full_like(ref_k, float("nan")), torch.full_like(ref_v, float("nan"))
    gather_blocks(host_k, host_v, staged_k, staged_v, load, method="copies")
    assert torch.equal(staged_k.nan_to_num(7.0), ref_k.nan_to_num(7.0))
    kn, vn = torch.randn(2, 3, 16, generator=g), torch.randn(2, 3, 16, generator=g)
    pos = torch.tensor([5, 71])
    write_tokens(host_k, host_v, kn, vn, pos, method="index")
    assert torch.equal(host_k[1, :, 8, 7], kn[1]) and torch.equal(host_v[0, :, 0, 5], vn[0])


@needs_kernels
def test_triton_kernels_match_references():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    host_k, host_v = torch.randn(2, 2, 6, 16, 16, generator=g), torch.randn(2, 2, 6, 16, 16, generator=g)
    load = torch.randint(-1, 6, (2, 2, 3), generator=g)
    ref_k, ref_v = torch.full((2, 2, 3, 16, 16), float("nan")), torch.full((2, 2, 3, 16, 16), float("nan"))
    gather_blocks(host_k, host_v, ref_k, ref_v, load, method="index")
    if dev == "cuda":
        host_k, host_v = host_k.pin_memory(), host_v.pin_memory()
    got_k, got_v = ref_k.new_full(ref_k.shape, float("nan")).to(dev), ref_v.new_full(ref_v.shape, float("nan")).to(dev)
    gather_blocks(host_k, host_v, got_k, got_v, load.to(dev), method="kernel", n_ctas=3)
    assert torch.equal(got_k.cpu().nan_to_num(3.0), ref_k.nan_to_num(3.0))
    assert torch.equal(got_v.cpu().nan_to_num(3.0), ref_v.nan_to_num(3.0))
    kn, vn = torch.randn(2, 2, 16, generator=g).to(dev), torch.randn(2, 2, 16, generator=g).to(dev)
    pos = torch.tensor([17, 90]).to(dev)
    write_tokens(host_k, host_v, kn, vn, pos, method="kernel")
    assert torch.equal(host_k[0, :, 1, 1], kn[0].cpu()) and torch.equal(host_v[1, :, 5, 10], vn[1].cpu())
    # block attention: pool with tail, several splits
    r, hq, h, d, bs, s, k = 3, 4, 2, 16, 16, 5, 4
    q = torch.randn(r, hq, d, generator=g) * 3
    pk, pv = torch.randn(r, h, s, bs, d, generator=g), torch.randn(r, h, s, bs, d, generator=g)
    tk, tv = torch.randn(r, h, bs, d, generator=g), torch.randn(r, h, bs, d, generator=g)
    pos = torch.tensor([70, 33, 5])
    blk = torch.tensor([[0, 2, 4, -1], [0, 1, 2, -1], [0, -1, -1, -1]])[:, None].expand(r, h, k).contiguous()
    idx = torch.where(blk >= 0, torch.randint(0, s, (r, h, k), generator=g), -1)
    ref = block_attention_reference(q, pk, pv, idx, blk, pos, block_size=bs, scale=0.25, tail_k=tk, tail_v=tv)
    for splits in (1, 3):
        got = block_attention_triton(*(x.to(dev) for x in (q, pk, pv, idx, blk, pos)), block_size=bs, scale=0.25,
                                     tail_k=tk.to(dev), tail_v=tv.to(dev), n_splits=splits).cpu()
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()
    # shared pool (prefill), no tail
    shared = block_attention_reference(q, pk[:1], pv[:1], idx, blk, pos, block_size=bs, scale=0.25, shared=True)
    got = block_attention_triton(*(x.to(dev) for x in (q, pk[:1], pv[:1], idx, blk, pos)), block_size=bs,
                                 scale=0.25, shared=True).cpu()
    assert torch.allclose(got, shared, atol=1e-4, rtol=1e-4)


def test_cli_generate_streams_text(tmp_path, capsys):
    from sparsa.checkpoint import save_model
    from sparsa.cli import main

    cfg = make_config(vocab_size=256)
    torch.manual_seed(0)
    model = SparsaLM(cfg)
    save_model(tmp_path / "ckpt", model, cfg)
    rc = main(["generate", str(tmp_path / "ckpt"), "--mode", "offload", "--prompt", "Hello", "--max-new-tokens", "6",
               "--temperature", "0.8", "--top-p", "0.9", "--seed", "1", "--device", "cpu"])
    assert rc == 0
    assert capsys.readouterr().out.startswith("Hello")
    rc = main(["generate", str(tmp_path / "ckpt"), "--mode", "sparda", "--prompt", "Hi"])
    assert rc == 2  # no forecasts in this checkpoint: a clear error
    assert "forecast" in capsys.readouterr().err
    if hasattr(model, "add_forecasts"):
        model.add_forecasts()
        save_model(tmp_path / "fc", model, cfg, extra=model.checkpoint_meta())
        rc = main(["generate", str(tmp_path / "fc"), "--mode", "sparda", "--prompt", "Hi", "--prompt", "Hello there",
                   "--max-new-tokens", "5", "--device", "cpu", "--stats"])
        assert rc == 0
        captured = capsys.readouterr()
        assert captured.out.startswith("Hi") and "[1] Hello there" in captured.out
        assert "hit_rate" in captured.err


@needs_kernels
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="CPU model through the Triton interpreter; on a GPU scripts/gpu_serve.py covers these paths")
def test_engine_kernel_paths_match_reference_paths():
    """The Triton attention, gather, write-through and selection kernels inside the engine (interpreter on CPU)."""
    model = make_model(10, forecasts=True, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, max_seq_len=96,
                       sparse=SparseConfig(block_size=16, topk=3, init_blocks=1, local_blocks=1))
    prompts, cont = batch_data(11, lengths=(33, 9), n_new=4)
    for mode in ("sparda",):  # layer 0 resident (the sparse path), layer 1 offloaded: slots, tail, gather, write
        ref_eng = Engine(model, mode=mode, max_batch=2, prefill_chunk=32, backend="reference")
        ref_eng.record = {}
        ref = teacher_forced(ref_eng, prompts, cont)
        ker = Engine(model, mode=mode, max_batch=2, prefill_chunk=32, backend="triton")
        ker.replay = ref_eng.record
        got = teacher_forced(ker, prompts, cont)
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (mode, (got - ref).abs().max())
        if mode != "sparse":
            assert ker.counters()["block_misses"] == ref_eng.counters()["block_misses"]


def test_replicate_and_set_batch_rows_decode_like_row_zero():
    model = make_model(14)
    prompt, cont = batch_data(15, lengths=(30,), n_new=3)
    for mode in ("sparse", "offload"):
        eng = Engine(model, mode=mode, max_batch=3, prefill_chunk=16)
        first = eng.prefill(prompt)
        eng.replicate(3)
        out = eng.decode_step(cont[0, :1].repeat(3))
        assert torch.equal(out[1], out[0]) and torch.equal(out[2], out[0])
        eng.set_batch(2)
        assert eng.decode_step(torch.tensor([5, 5])).shape == (2, first.shape[-1])
        with pytest.raises(ValueError, match="max_batch"):
            eng.set_batch(4)
        with pytest.raises(ValueError, match="CUDA"):
            eng.capture_graph(torch.tensor([1, 2]))


def _chosen_overlap(record, n_steps, layer, init_blocks=1, local_blocks=1, block_size=BS, positions=None):
    """Mean share of step s's chosen (non-forced) blocks still selected at step s + 1."""
    shares = []
    for s in range(n_steps - 1):
        a, b = record[("decode", s, layer)], record[("decode", s + 1, layer)]
        for r in range(a.shape[0]):
            cur = int(positions[r]) + s
            for h in range(a.shape[1]):
                forced = {c for c in range(init_blocks)} | {cur // block_size - i for i in range(local_blocks + 1)}
                chosen = {int(c) for c in a[r, h] if c >= 0} - forced
                nxt = {int(c) for c in b[r, h] if c >= 0}
                if chosen:
                    shares.append(len(chosen & nxt) / len(chosen))
    return sum(shares) / len(shares)


def test_locality_selection_sets_retention_and_keeps_modes_exact():
    from sparsa.serve.testing import LocalitySelection

    with pytest.raises(ValueError, match="retention"):
        LocalitySelection(1.5)
    model = make_model(6, forecasts=True, max_seq_len=256)
    lengths, n_new = (150, 170), 24
    prompts, cont = batch_data(7, lengths=lengths, n_new=n_new)
    cfg = dict(max_batch=2, prefill_chunk=32, topk=8)
    overlap, hit_rate = {}, {}
    for retention in (0.0, 1.0):
        torch.manual_seed(0)
        eng = Engine(model, mode="offload", **cfg)
        eng.selection_model = LocalitySelection(retention)
        eng.record = {}
        teacher_forced(eng, prompts, cont)
        overlap[retention] = _chosen_overlap(eng.record, n_new, layer=2, positions=lengths)
        hit_rate[retention] = eng.counters()["hit_rate"]
    # retention 1: every chosen block stays unless it becomes forced/out of range; 0: random choice
    assert overlap[1.0] > 0.95 and overlap[0.0] < 0.6, overlap
    assert hit_rate[1.0] > hit_rate[0.0] + 0.2, hit_rate
    # the same synthetic stream in sparda (forecast rule) and sparse: equal outputs
    torch.manual_seed(1)
    sparda = Engine(model, mode="sparda", **cfg)
    sparda.selection_model = LocalitySelection(0.75)
    sparda.record = {}
    got = teacher_forced(sparda, prompts, cont)
    sparse = Engine(model, mode="sparse", **cfg)
    sparse.replay = sparda.record
    assert torch.equal(got, teacher_forced(sparse, prompts, cont))
    share = _chosen_overlap(sparda.record, n_new, layer=2, positions=lengths)
    assert 0.55 < share < 0.95, share


@needs_kernels
def test_slot_diff_kernel_matches_reference_at_engine_sizes():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(3)
    b, h, k, n_blocks = 2, 3, 96, 400  # selections are built on the CPU, then moved
    bm = torch.full((b, h, k), -1, dtype=torch.long, device=dev)
    cur = torch.tensor([390, 250], device=dev)
    prev = None
    for step in range(6):
        rows = []
        for i in range(b * h):
            fresh = torch.randperm(n_blocks, generator=g)[:k]
            if prev is not None:  # keep about 70% of the previous selection
                old = prev.view(-1, k)[i]
                old = old[old >= 0]
                fresh = torch.cat([old[torch.rand(old.numel(), generator=g) < 0.7], fresh])
            uniq = []
            for x in fresh.tolist():
                if x not in uniq:
                    uniq.append(x)
            chosen = torch.tensor(sorted(uniq[: k - step]), dtype=torch.long)  # step -1 paddings
            rows.append(torch.cat([chosen, torch.full((step,), -1, dtype=torch.long)]))
        sel = torch.stack(rows).view(b, h, k).to(torch.int32).to(dev)
        got = slot_diff(sel, bm, cur, method="kernel")
        want = slot_diff(sel, bm, cur, method="torch")
        for x, y in zip(got, want):
            assert torch.equal(x, y)
        assert int(got[3].sum()) > 0 or step == 0
        bm, prev = got[0], sel.to(torch.long).cpu()


@pytest.mark.parametrize("n_blocks,topk", [(37, 8), (5, 8), (300, 96)])
@needs_kernels
def test_finish_selection_kernel_matches_reference(n_blocks, topk):
    from sparsa.serve.select import finish_selection

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(n_blocks)
    rows, heads, bs = 6, 3, 16
    score = torch.randn(rows, heads, n_blocks, generator=g)
    score[0] = torch.round(score[0])  # many ties: the lower block wins
    score[1, 0] = 0.0
    score[1, 1, ::2] = -0.0
    score[2, 0] = float("-inf")  # nothing selectable beyond the forced blocks
    score[3] *= 1e30
    pos = torch.randint(0, n_blocks * bs, (rows,), generator=g)
    pos[4] = 0  # first token: only block 0
    for init, local in ((1, 1), (2, 3), (0, 1)):
        kw = dict(block_size=bs, topk=topk, init_blocks=init, local_blocks=local)
        got = finish_selection(score.to(dev), pos.to(dev), method="kernel", **kw)
        want = finish_selection(score.to(dev), pos.to(dev), method="torch", **kw)
        assert got.dtype == want.dtype and torch.equal(got, want), (init, local)


@pytest.mark.parametrize("group,head_dim", [(1, 16), (3, 24), (4, 32)])
@needs_kernels
def test_score_kernels_match_references(group, head_dim):
    from sparsa.serve.select import forecast_scores, ssa_scores

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(group)
    rows, heads, n_blocks, bs = 4, 2, 70, 8
    kbar = torch.randn(rows, heads, n_blocks, head_dim, generator=g).to(dev)
    q = (3 * torch.randn(rows, heads * group, head_dim, generator=g)).to(dev)
    f = torch.randn(rows, heads, head_dim, generator=g).to(dev)
    pos = torch.tensor([3, 9, 300, n_blocks * bs - 1], device=dev)  # row 0 sees no complete block
    for dtype in (torch.float32, torch.float16):
        kb = kbar.to(dtype)
        got = forecast_scores(f.to(dtype), kb, method="kernel")
        want = forecast_scores(f.to(dtype), kb, method="torch")
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
        got = ssa_scores(q.to(dtype), kb, pos, block_size=bs, scale=head_dim**-0.5, method="kernel")
        want = ssa_scores(q.to(dtype), kb, pos, block_size=bs, scale=head_dim**-0.5, method="torch")
        n_vis = ((pos + 1) // bs).tolist()
        for r in range(rows):  # the reference leaves invisible blocks unspecified (finish_selection masks them)
            v = n_vis[r]
            assert torch.allclose(got[r, :, :v], want[r, :, :v], rtol=1e-5, atol=1e-6), (dtype, r)
            assert torch.all(got[r, :, v:] == 0)
        assert torch.allclose(got[2].sum(-1), torch.full_like(got[2].sum(-1), float(group)), rtol=1e-5)


@pytest.mark.parametrize("method", ["torch", "kernel"])
def test_slot_update_is_slot_diff_in_place(method):
    if method == "kernel" and not KERNELS_OK:
        pytest.skip("needs triton (GPU or interpreter)")
    from sparsa.serve.select import slot_update

    dev = "cuda" if method == "kernel" and torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(5)
    b, h, k, n_blocks = 2, 3, 7, 30
    cur = torch.tensor([29, 12])
    bm_ref = torch.full((b, h, k), -1, dtype=torch.long)
    bm = bm_ref.clone().to(dev)
    totals = torch.zeros(2, dtype=torch.long, device=dev)
    want_hits = want_misses = 0
    for _ in range(5):
        sel = torch.stack([torch.randperm(n_blocks, generator=g)[:k] for _ in range(b * h)]).view(b, h, k)
        sel[0, 0, 2] = 29  # the current block of sequence 0
        sel[1, :, -2:] = -1
        sel = torch.where(sel < 0, 99, sel).sort(dim=-1).values
        sel = torch.where(sel == 99, -1, sel).to(torch.int32)
        new_map, load_ref, slot_ref, hits, misses = slot_diff(sel, bm_ref, cur, method="torch")
        load, entry = slot_update(sel.to(dev), bm, cur.to(dev), totals, method=method)
        assert torch.equal(bm.cpu(), new_map) and torch.equal(load.cpu(), load_ref)
        is_cur = sel.to(torch.long) == cur[:, None, None]
        assert torch.equal(entry.cpu(), torch.where(is_cur, 0, slot_ref))
        want_hits, want_misses = want_hits + int(hits.sum()), want_misses + int(misses.sum())
        assert totals.tolist() == [want_hits, want_misses]
        bm_ref = new_map
    with pytest.raises(ValueError, match="totals"):
        slot_update(sel, bm_ref, cur, torch.zeros(3, dtype=torch.long))


class _ReplayByEagerStep:
    """Stand-in for a captured CUDA graph on the CPU: a replay runs the engine's decode step on the
    static tokens (the GPU work a replay would do) and leaves the host-side step counters untouched
    (a replay runs no Python); the capture only advances those counters (it runs the Python, not the
    kernels)."""

    def __init__(self, engine):
        self.engine = engine

    def capture(self, static):
        self.static = static
        self.logits = torch.full((static.shape[0], self.engine.model.config.vocab_size), float("nan"))
        self.engine._step += 1
        self.engine._decode_steps += 1
        return self, self.logits

    def replay(self):
        eng = self.engine
        counters = (eng._step, eng._decode_steps)
        self.logits.copy_(eng.decode_step(self.static))
        eng._step, eng._decode_steps = counters


@pytest.mark.parametrize("mode", ["sparse", "sparda"])
def test_graphed_decode_steps_match_eager_steps(mode):
    """GraphedDecode (generate(cuda_graph=True)): eager warm-up steps, one capture, replays with the new
    tokens copied in; logits and counters equal plain decode steps."""
    from sparsa.serve.engine import GraphedDecode

    model = make_model(4, forecasts=mode == "sparda")
    prompts, cont = batch_data(seed=5, lengths=(40, 23), n_new=9)
    eager = Engine(model, mode=mode, max_batch=2, prefill_chunk=16)
    graphed = Engine(model, mode=mode, max_batch=2, prefill_chunk=16)
    eager.prefill(prompts)
    graphed.prefill(prompts)
    fake = _ReplayByEagerStep(graphed)
    decode = GraphedDecode(graphed, warmup=2, capture=fake.capture)
    for i in range(cont.shape[1]):
        ref = eager.decode_step(cont[:, i])
        got = decode(cont[:, i].clone())
        assert torch.equal(got, ref), (i, (got - ref).abs().max())
    assert decode.eager_steps == 2 and decode.graph is fake
    assert graphed.counters()["decode_steps"] == eager.counters()["decode_steps"] == cont.shape[1]
    assert graphed._step == eager._step
    decode.close()
    assert graphed.graph is None and decode.graph is None


def test_generate_cuda_graph_bad_requests():
    model = make_model(4)
    eng = Engine(model, mode="sparse", max_batch=1, prefill_chunk=16)
    with pytest.raises(ValueError, match="cuda_graph"):
        eng.generate([[1, 2, 3]], max_new_tokens=2, cuda_graph="yes")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA device"):
            eng.generate([[1, 2, 3]], max_new_tokens=2, cuda_graph=True)
        # the default (None) switches the graph on only where it applies: eager on the CPU
        assert eng.generate([[1, 2, 3]], max_new_tokens=3).steps == 3
