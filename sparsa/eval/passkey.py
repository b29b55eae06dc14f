"""Passkey retrieval: a number hidden at some depth of corpus filler text, asked for at the end."""
from __future__ import annotations

import numpy as np
import torch

PROMPT_NEEDLE = " The pass key is {key}. Remember it. "
PROMPT_QUESTION = " What is the pass key? The pass key is "


def build_passkey_prompt(filler: str, length: int, depth: float, key: str, tokenizer) -> list[int]:
    """Tokens of about `length` tokens: filler with the needle at fraction `depth`, then the question."""
    needle = tokenizer.encode(PROMPT_NEEDLE.format(key=key))
    question = tokenizer.encode(PROMPT_QUESTION)
    n_filler = length - len(needle) - len(question)
    if n_filler <= 0:
        raise ValueError(f"length {length} is too short for a passkey prompt")
    filler_tokens = tokenizer.encode(filler)
    while len(filler_tokens) < n_filler:
        filler_tokens = filler_tokens + filler_tokens
    filler_tokens = filler_tokens[:n_filler]
    cut = int(round(depth * n_filler))
    return filler_tokens[:cut] + needle + filler_tokens[cut:] + question


@torch.no_grad()
def greedy_continue(model, tokens: list[int], n_new: int, mode: str, device) -> list[int]:
    """Greedy decoding by re-running the whole prefix (no cache: a readable reference)."""
    seq = torch.tensor([tokens], dtype=torch.long, device=device)
    for _ in range(n_new):
        logits = model(seq, mode=mode).logits[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(tokens):].tolist()


def passkey_accuracy(model, filler: str, tokenizer, lengths, depths, mode: str, device, seed: int = 0,
                     trials: int = 1) -> dict:
    """Fraction of prompts whose greedy answer starts with the key, per length and overall."""
    rng = np.random.default_rng(seed)
    model.eval()
    results = []
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                key = str(int(rng.integers(10000, 99999)))
                prompt = build_passkey_prompt(filler, length, depth, key, tokenizer)
                answer = tokenizer.decode(greedy_continue(model, prompt, len(key), mode, device))
                results.append({"length": length, "depth": depth, "correct": answer.strip().startswith(key)})
    per_length = {str(n): float(np.mean([r["correct"] for r in results if r["length"] == n])) for n in lengths}
    return {"accuracy": float(np.mean([r["correct"] for r in results])), "per_length": per_length,
            "n_prompts": len(results)}
