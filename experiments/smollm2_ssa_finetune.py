"""A short SSA fine-tune of SmolLM2-135M converted to sparsa's SparsaLM, on CPU.

The GGUF model (dequantized to float32) is converted with sparsa.hf.hf_to_sparsa; the fine-tune uses
sparsa's SSA objective (SparsaLM.forward(..., align=True): CE of the drawn mode + alpha * mean over layers of
the bidirectional SmoothL1 alignment between full and sparse head outputs), one Bernoulli(full_ratio) mode
draw per step. Train data: sparsa's training split of Shakespeare; evaluation: held-out Shakespeare (the
validation documents), perplexity in full and sparse mode before and after. `--method full` is the
control: plain full-attention CE fine-tuning on the same data (separates domain adaptation from SSA).

    PYTHONPATH=. .venv/bin/python experiments/smollm2_ssa_finetune.py [--method ssa|full] [--steps 30]
Results: docs/results/smollm2_finetune_{method}.json and docs/results/smollm2_finetune.png.
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

RESULTS = Path("docs/results")


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, mode: str, min_position: int) -> dict:
    model.eval()
    targets = torch.cat([windows[:, 1:], torch.full((windows.shape[0], 1), -100)], dim=1)
    logits = model(windows, mode=mode).logits.float()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                            reduction="none").view(windows.shape)[:, :-1]
    model.train()
    return {"ppl_all": math.exp(float(nll.mean())), "ppl_late": math.exp(float(nll[:, min_position:].mean()))}


def evaluate(model, windows, min_position) -> dict:
    return {mode: perplexity(model, windows, mode, min_position) for mode in ("full", "sparse")}


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def plot(records: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, rec in sorted(records.items()):
        steps = [r["step"] for r in rec["log"]]
        axes[0].plot(steps, [r["ce"] for r in rec["log"]], marker=".", label=f"{method}: train CE (drawn mode)")
        if method == "ssa":
            axes[0].plot(steps, [r["align"] for r in rec["log"]], marker=".", label="ssa: alignment loss")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=7)
    labels, values, colors = [], [], []
    for method, rec in sorted(records.items()):
        for when in ("before", "after"):
            for mode in ("full", "sparse"):
                if when == "before" and method != min(records):
                    continue
                labels.append(f"{mode}\n{when}" + ("" if when == "before" else f"\n({method})"))
                values.append(rec[when][mode]["ppl_late"])
                colors.append("tab:blue" if mode == "full" else "tab:orange")
    axes[1].bar(range(len(values)), values, color=colors)
    axes[1].set_xticks(range(len(values)), labels, fontsize=7)
    rec = next(iter(records.values()))
    axes[1].set_ylabel(f"held-out perplexity, positions >= {rec['settings']['min_position']}")
    axes[1].set_title(f"sparse: block {rec['settings']['block_size']}, topk {rec['settings']['topk']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "smollm2_finetune.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=("ssa", "full"), default="ssa")
    p.add_argument("--cache-dir", default="runs/smollm2-hf")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--alpha", type=float, default=10.0)
    p.add_argument("--full-ratio", type=float, default=0.5)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=2)
    p.add_argument("--min-position", type=int, default=128)
    p.add_argument("--train-docs", type=int, default=4, help="training documents tokenized (of sparsa's split)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    started = time.time()
    hf_model, tokenizer = load_smollm2(cache_dir=args.cache_dir)
    model = hf_to_sparsa(hf_model, SparseConfig(block_size=args.block_size, topk=args.topk))
    del hf_model
    train_texts, val_texts = split_documents(load_documents(None))
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    train_tokens = np.concatenate([np.asarray(encode(t)) for t in train_texts[:args.train_docs]])
    val_tokens = encode(val_texts[0])
    n = args.eval_seq_len
    windows = torch.tensor([val_tokens[i * n:(i + 1) * n] for i in range(args.eval_windows)])
    before = evaluate(model, windows, args.min_position)
    print("before", before, flush=True)
    decay = [p_ for p_ in model.parameters() if p_.ndim >= 2]
    other = [p_ for p_ in model.parameters() if p_.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0}, {"params": other, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(args.seed)
    log = []
    model.train()
    for step in range(args.steps):
        t0 = time.time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        offsets = rng.integers(0, len(train_tokens) - args.seq_len - 1, size=args.batch_size)
        batch = torch.from_numpy(np.stack([train_tokens[o:o + args.seq_len + 1] for o in offsets])).long()
        tokens, targets = batch[:, :-1], batch[:, 1:]
        if args.method == "ssa":
            mode = "full" if rng.random() < args.full_ratio else "sparse"
            out = model(tokens, targets=targets, mode=mode, align=True, alpha=args.alpha)
        else:
            mode = "full"
            out = model(tokens, targets=targets, mode="full")
        out.loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rec = {"step": step, "mode": mode, "ce": float(out.ce.detach()),
               "align": None if out.align is None else float(out.align.detach()),
               "grad_norm": grad_norm, "seconds": time.time() - t0}
        log.append(rec)
        print(rec, flush=True)
    after = evaluate(model, windows, args.min_position)
    print("after", after, flush=True)
    result = {"method": args.method, "settings": vars(args), "before": before, "after": after, "log": log,
              "n_params": model.n_params(), "train_tokens_available": len(train_tokens),
              "tokens_seen": args.steps * args.batch_size * args.seq_len, "total_seconds": time.time() - started,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"smollm2_finetune_{args.method}.json").write_text(json.dumps(result, indent=2))
    records = {}
    for method in ("ssa", "full"):
        path = RESULTS / f"smollm2_finetune_{method}.json"
        if path.exists():
            records[method] = json.loads(path.read_text())
    plot(records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
