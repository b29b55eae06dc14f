"""`sparsa generate CHECKPOINT --prompt ... --mode dense|sparse|offload|sparda` (streams text).

Text is UTF-8 bytes for sparsa checkpoints (vocab 256); checkpoints converted from Hugging Face with
`sparsa convert` carry their tokenizer in `<checkpoint>/tokenizer` and stop at its EOS token."""
from __future__ import annotations

import argparse
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
    p.add_argument("--stop", action="append", default=[],
                   help="stop string, one token (one byte for byte models); converted models also stop at EOS")
    p.add_argument("--max-len", type=int, default=None, help="context capacity (default: the model's)")
    p.add_argument("--topk", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on cuda)")
    p.add_argument("--stats", action="store_true", help="print the engine counters as JSON to stderr")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the decode step from a CUDA graph (default: on for CUDA in modes sparse, "
                        "offload, sparda; --no-cuda-graph: eager steps)")


def load_text_tokenizer(checkpoint, vocab_size: int):
    """The checkpoint's tokenizer (`sparsa.data.tokenizer_for_checkpoint`), with its stop tokens."""
    from ..data import tokenizer_for_checkpoint

    tok = tokenizer_for_checkpoint(checkpoint, vocab_size)
    if not hasattr(tok, "stop"):
        tok.stop = []
    return tok


def cmd_generate(args) -> int:
    import torch

    from ..checkpoint import load_model
    from .engine import Engine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype_name not in dtypes:
        raise ValueError(f"--dtype must be one of {sorted(dtypes)}, got {dtype_name!r}")
    model, meta = load_model(args.checkpoint, device=device)
    model = model.to(dtypes[dtype_name])
    tok = load_text_tokenizer(args.checkpoint, model.config.vocab_size)
    prompts = [tok.encode(p) for p in args.prompt]
    stops = list(tok.stop)
    for s in args.stop:
        ids = tok.encode(s)
        if len(ids) != 1:
            raise ValueError(f"--stop {s!r} must encode to a single token, got {len(ids)}")
        stops.append(ids[0])
    engine = Engine(model, mode=args.mode, max_batch=len(prompts), max_len=args.max_len, topk=args.topk)
    out = sys.stdout
    out.write(args.prompt[0])
    out.flush()
    generated: list[int] = []
    shown = [0]  # characters of the decoded continuation already written

    def on_step(step, tokens):
        t = int(tokens[0])  # reads the device: streaming synchronises once per token
        if t < 0:
            return
        generated.append(t)
        text = tok.decode(generated)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        out.write(text[shown[0]:])
        shown[0] = len(text)
        out.flush()

    result = engine.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, seed=args.seed, stop_tokens=stops, on_step=on_step,
                             cuda_graph=args.cuda_graph)
    out.write(tok.decode(generated)[shown[0]:] + "\n")
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
