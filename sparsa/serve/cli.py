"""`sparsa generate CHECKPOINT --prompt ... --mode dense|sparse|offload|sparda` (streams text)."""
from __future__ import annotations

import json
import sys


def add_generate_args(p) -> None:
    p.add_argument("checkpoint", help="sparsa checkpoint folder (config.json + model.safetensors)")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text (repeat for a batch; only the first is streamed)")
    p.add_argument("--mode", default="sparse", help="dense | sparse | offload | sparda")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (a single byte for byte models)")
    p.add_argument("--max-len", type=int, default=None, help="context capacity (default: the model's)")
    p.add_argument("--topk", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on cuda)")
    p.add_argument("--stats", action="store_true", help="print the engine counters as JSON to stderr")


def cmd_generate(args) -> int:
    import torch

    from ..checkpoint import load_model
    from ..data import ByteTokenizer
    from .engine import Engine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype_name not in dtypes:
        raise ValueError(f"--dtype must be one of {sorted(dtypes)}, got {dtype_name!r}")
    model, meta = load_model(args.checkpoint, device=device)
    model = model.to(dtypes[dtype_name])
    if model.config.vocab_size != 256:
        raise ValueError("sparsa generate reads byte-level checkpoints (vocab_size 256); "
                         f"this one has vocab_size {model.config.vocab_size}")
    tok = ByteTokenizer()
    prompts = [tok.encode(p) for p in args.prompt]
    stops = []
    for s in args.stop:
        ids = tok.encode(s)
        if len(ids) != 1:
            raise ValueError(f"--stop {s!r} must be a single byte")
        stops.append(ids[0])
    engine = Engine(model, mode=args.mode, max_batch=len(prompts), max_len=args.max_len, topk=args.topk)
    out = sys.stdout
    out.write(args.prompt[0])
    out.flush()
    pending: list[int] = []

    def on_step(step, tokens):
        t = int(tokens[0])
        if t < 0:
            return
        pending.append(t)
        try:
            text = bytes(pending).decode("utf-8")
        except UnicodeDecodeError:
            if len(pending) < 4:
                return
            text = bytes(pending).decode("utf-8", errors="replace")
        pending.clear()
        out.write(text)
        out.flush()

    result = engine.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, seed=args.seed, stop_tokens=stops, on_step=on_step)
    if pending:
        out.write(bytes(pending).decode("utf-8", errors="replace"))
    out.write("\n")
    for i, row in enumerate(result.tokens[1:], start=1):
        out.write(f"[{i}] {args.prompt[i]}{tok.decode(row)}\n")
    out.flush()
    if args.stats:
        stats = dict(result.counters, prefill_s=result.prefill_s, decode_s=result.decode_s, steps=result.steps)
        print(json.dumps(stats), file=sys.stderr)
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a checkpoint (dense | sparse | offload | sparda)")
    add_generate_args(p)
    p.set_defaults(func=cmd_generate)
