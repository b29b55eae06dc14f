"""SparDA forecast distillation on SmolLM2-135M (converted to SparsaLM), on CPU; a short run.

Uses sparsa/train/forecast.py (`distill_step`: layer-wise frozen-backbone distillation) on SmolLM2-tokenized
Shakespeare (sparsa's training split), forecasts warm-started from the queries (`add_forecasts("query")`).
Evaluation: held-out perplexity in sparse mode with the query selector (SSA) and with the forecast selector,
before and after distillation.

    PYTHONPATH=. .venv/bin/python experiments/smollm2_forecast.py [--steps 40]
Results: docs/results/smollm2_forecast.json
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from sparsa.config import SparseConfig
from sparsa.data import load_documents, split_documents
from sparsa.hf import hf_to_sparsa, load_smollm2
from sparsa.train.forecast import DistillConfig, distill_step, freeze_backbone, make_forecast_optimizer

RESULTS = Path("docs/results")


@torch.no_grad()
def perplexity(model, windows, mode, selector, min_position) -> dict:
    targets = torch.cat([windows[:, 1:], torch.full((windows.shape[0], 1), -100)], dim=1)
    logits = model(windows, mode=mode, selector=selector).logits.float()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                            reduction="none").view(windows.shape)[:, :-1]
    return {"ppl_all": math.exp(float(nll.mean())), "ppl_late": math.exp(float(nll[:, min_position:].mean()))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", default="runs/smollm2-hf")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--target", default="block_mass", choices=("block_mass", "topk_rest"))
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=2)
    p.add_argument("--min-position", type=int, default=128)
    p.add_argument("--train-docs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    started = time.time()
    hf_model, tokenizer = load_smollm2(cache_dir=args.cache_dir)
    model = hf_to_sparsa(hf_model, SparseConfig(block_size=args.block_size, topk=args.topk))
    del hf_model
    model.add_forecasts(init="query")
    freeze_backbone(model)
    train_texts, val_texts = split_documents(load_documents(None))
    train_tokens = np.concatenate([np.asarray(tokenizer.encode(t, add_special_tokens=False))
                                   for t in train_texts[:args.train_docs]])
    val = tokenizer.encode(val_texts[0], add_special_tokens=False)
    n = args.eval_seq_len
    windows = torch.tensor([val[i * n:(i + 1) * n] for i in range(args.eval_windows)])
    model.eval()
    before = {sel: perplexity(model, windows, "sparse", sel, args.min_position) for sel in ("query", "forecast")}
    before["full"] = perplexity(model, windows, "full", "query", args.min_position)
    print("before", before, flush=True)
    cfg = DistillConfig(checkpoint="-", steps=args.steps, lr=args.lr, target=args.target, init="query",
                        backbone_mode="sparse", progress=False)
    optimizer = make_forecast_optimizer(model, cfg)
    rng = np.random.default_rng(args.seed)
    log = []
    for step in range(args.steps):
        t0 = time.time()
        offset = int(rng.integers(0, len(train_tokens) - args.seq_len))
        tokens = torch.from_numpy(train_tokens[offset:offset + args.seq_len]).long()[None, :]
        losses = distill_step(model, tokens, None, cfg)
        torch.nn.utils.clip_grad_norm_(model.forecast_parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rec = {"step": step, "mean_layer_loss": float(np.mean(losses)), "seconds": time.time() - t0}
        log.append(rec)
        print(rec, flush=True)
    after = {sel: perplexity(model, windows, "sparse", sel, args.min_position) for sel in ("query", "forecast")}
    print("after", after, flush=True)
    result = {"settings": vars(args), "before": before, "after": after, "log": log,
              "total_seconds": time.time() - started}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "smollm2_forecast.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
