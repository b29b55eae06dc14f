"""Why does training-free sparse passkey retrieval fail? Is the needle's block selected at the question?

Runs the converted SparsaLM once in full mode on the passkey prompt, records every layer's post-RoPE q, k,
and reports, for the answer position (the last prompt token), the fraction of (layer, KV head) pairs whose
SSA selection (block 16, topk K) contains a block overlapping the needle, plus the full-attention mass on
the needle tokens. Same prompt construction and keys as experiments/smollm2_sparse_inference.py.

    PYTHONPATH=. .venv/bin/python experiments/smollm2_passkey_selection.py --length 2048 --key 67325
Results: docs/results/smollm2_passkey_selection.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sparsa.config import SparseConfig
from sparsa.eval.passkey import PROMPT_NEEDLE, build_passkey_prompt
from sparsa.hf import hf_to_sparsa, load_smollm2
from sparsa.hf.attention import select_blocks_at

RESULTS = Path("docs/results")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--key", default="67325")
    p.add_argument("--depth", type=float, default=0.5)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--topks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--cache-dir", default="runs/smollm2-hf")
    args = p.parse_args(argv)
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from smollm2_sparse_inference import TokenizerAdapter, validation_tokens

    hf_model, tokenizer = load_smollm2(cache_dir=args.cache_dir)
    model = hf_to_sparsa(hf_model, SparseConfig(block_size=args.block_size, topk=max(args.topks)))
    del hf_model
    adapter = TokenizerAdapter(tokenizer)
    _, text = validation_tokens(adapter, 1)
    prompt = build_passkey_prompt(text, args.length, args.depth, args.key, adapter)
    needle = adapter.encode(PROMPT_NEEDLE.format(key=args.key))
    start = next(i for i in range(len(prompt)) if prompt[i:i + len(needle)] == needle)
    key_tokens = set(range(start, start + len(needle)))
    needle_blocks = {t // args.block_size for t in key_tokens}
    for layer in model.layers:
        layer.attn.record = {}
    with torch.no_grad():
        model(torch.tensor([prompt]), mode="full")
    t = len(prompt) - 1
    pos = torch.tensor([[t]])
    out = {"length": len(prompt), "key": args.key, "needle_tokens": [start, start + len(needle)],
           "needle_blocks": sorted(needle_blocks), "answer_position": t, "block_size": args.block_size, "topk": {}}
    masses = []
    for layer in model.layers:
        q, k = layer.attn.record["q"], layer.attn.record["k"]
        qt = q[:, t:t + 1].float()
        group = q.shape[2] // k.shape[2]
        logits = torch.einsum("bthd,bjhd->bthj", qt, k.float().repeat_interleave(group, dim=2)) * q.shape[-1] ** -0.5
        probs = torch.softmax(logits, dim=-1)[0, 0]  # [Hq, T]
        masses.append(float(probs[:, start:start + len(needle)].sum(-1).mean()))
    out["needle_attention_mass_per_layer"] = masses
    for topk in args.topks:
        hits = []
        for layer in model.layers:
            q, k = layer.attn.record["q"], layer.attn.record["k"]
            idx = select_blocks_at(q[:, t:t + 1], k, pos, block_size=args.block_size, topk=topk, init_blocks=0,
                                   local_blocks=1, scale=q.shape[-1] ** -0.5)[0, 0]  # [Hkv, topk]
            hits.append([bool(needle_blocks & set(row.tolist())) for row in idx])
        out["topk"][str(topk)] = {"per_layer_heads_hit": hits,
                                  "fraction_hit": sum(map(sum, hits)) / sum(map(len, hits))}
        print(topk, out["topk"][str(topk)]["fraction_hit"], flush=True)
    print("needle mass per layer", [round(m, 3) for m in masses])
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "smollm2_passkey_selection.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old[str(len(prompt))] = out
    path.write_text(json.dumps(old, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
