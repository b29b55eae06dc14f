"""Command line: `sparsa train | eval | demo | ...` (run `sparsa COMMAND --help`)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def add_train_args(p: argparse.ArgumentParser) -> None:
    from .train.ssa import TrainConfig

    defaults = TrainConfig()
    p.add_argument("--out", default=defaults.out, help="run folder (checkpoint, metrics.jsonl, loss.png)")
    p.add_argument("--preset", default=defaults.preset, help="model preset: tiny | small")
    p.add_argument("--method", default=defaults.method, help="full | sparse | ssa")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the preset's context)")
    p.add_argument("--grad-accum", type=int, default=defaults.grad_accum)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--grad-clip", type=float, default=defaults.grad_clip)
    p.add_argument("--alpha", type=float, default=defaults.alpha, help="SSA alignment weight")
    p.add_argument("--full-ratio", type=float, default=defaults.full_ratio, help="SSA probability of full mode")
    p.add_argument("--topk", type=int, default=None, help="selected blocks per query (default: preset)")
    p.add_argument("--block-size", type=int, default=None, help="selection block size (default: preset)")
    p.add_argument("--variant", default="ssa", choices=("ssa", "nsa"),
                   help="sparse mode: selected blocks only (ssa) or NSA's three gated branches (nsa)")
    p.add_argument("--eval-every", type=int, default=defaults.eval_every)
    p.add_argument("--eval-batches", type=int, default=defaults.eval_batches)
    p.add_argument("--save-every", type=int, default=defaults.save_every)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--data", default=None, help="text file or folder (default: Shakespeare)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many steps of this run")
    p.add_argument("--no-progress", action="store_true")


def train_config_from_args(args):
    from .train.ssa import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["progress"] = not args.no_progress
    return TrainConfig(**values)


def cmd_train(args) -> int:
    from .train import train

    summary = train(train_config_from_args(args))
    print(json.dumps({k: v for k, v in summary.items() if k != "last"}))
    return 0


def cmd_eval(args) -> int:
    from .eval import EvalConfig, evaluate_checkpoint

    cfg = EvalConfig(
        checkpoint=args.checkpoint, data=args.data, seq_len=args.seq_len, batch_size=args.batch_size,
        max_batches=args.max_batches, device=args.device,
        topk_sweep=tuple(args.topk_sweep) if args.topk_sweep else None,
        passkey_lengths=tuple(args.passkey_lengths) if args.passkey_lengths else None,
        selector=args.selector,
    )
    result = evaluate_checkpoint(cfg)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"checkpoint {result['checkpoint']} ({result['method']}), block {result['block_size']}, topk {result['topk']}")
        print(f"bits per byte: full {result['bpb']['full']:.4f}  sparse {result['bpb']['sparse']:.4f}")
        print("topk sweep (sparse bpb): " + ", ".join(f"{k}: {v:.4f}" for k, v in result["topk_sweep"].items()))
        print(f"{'layer':>5} {'AttnSparsity':>13} {'delta':>7} {'entropy':>8} {'thm1 residual':>14}")
        for r in result["layers"]:
            print(f"{r['layer']:>5} {r['attn_sparsity']:>13.4f} {r['delta']:>7.4f} {r['entropy_bits']:>8.3f} "
                  f"{r['theorem1_residual']:>14.2e}")
        print("passkey accuracy: " + ", ".join(f"{m}: {v['accuracy']:.2f}" for m, v in result["passkey"].items()))
        if "forecast" in result:
            fc = result["forecast"]
            print(f"forecast selector: mean recall (layers >= 1) {fc['mean_recall_ge1']:.3f}, "
                  f"sparse perplexity forecast / query = {fc['ppl_ratio_forecast_vs_query']:.4f}")
        print(f"figure: {result.get('figure')}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, steps=args.steps, progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsa", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model: full, sparse or SSA")
    add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint in both modes")
    p.add_argument("checkpoint")
    p.add_argument("--data", default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-batches", type=int, default=8)
    p.add_argument("--topk-sweep", type=int, nargs="+", default=None)
    p.add_argument("--passkey-lengths", type=int, nargs="+", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--selector", default="query", choices=("query", "forecast"),
                   help="block selector of the sparse-mode numbers (forecast: SparDA lookahead)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="train tiny full / sparse / SSA models and compare (CPU, minutes)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    for module_name in PLUGIN_MODULES:
        register_plugin(sub, module_name)
    return parser


# Feature modules that add sub-commands through `register_cli(subparsers)`; each sets
# `func` on its parsers. Commands: distill-forecast, generate, bench, experiment, convert, ...
PLUGIN_MODULES = (
    "sparsa.train.forecast",
    "sparsa.serve.cli",
    "sparsa.hf.cli",
    "sparsa.experiments",
)


def register_plugin(sub, module_name: str) -> None:
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            return  # the feature is not part of this install
        raise
    register = getattr(module, "register_cli", None)
    if register is not None:
        register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"sparsa {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
