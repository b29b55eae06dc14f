"""Multi-GPU training with torchrun (DDP or FSDP2), and SparDA forecast distillation:

  torchrun --standalone --nproc-per-node N -m sparsa.train [--parallel ddp|fsdp] [flags of `sparsa train`]
  torchrun --standalone --nproc-per-node N -m sparsa.train distill-forecast CHECKPOINT [flags of `sparsa distill-forecast`]

Without torchrun (`python -m sparsa.train ...`) both run on one process, as the `sparsa` commands do.
See docs/distributed.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from ..cli import add_train_args, train_config_from_args

DISTILL = "distill-forecast"


def _add_common(parser: argparse.ArgumentParser, choices: tuple[str, ...]) -> None:
    parser.add_argument("--parallel", default="ddp", choices=choices,
                        help="ddp: DistributedDataParallel; fsdp: FSDP2 fully_shard (default: ddp)")
    parser.add_argument("--backend", default=None, help="process group backend (default: nccl on CUDA, gloo on CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchrun ... -m sparsa.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser)
    _add_common(parser, ("ddp", "fsdp"))
    return parser


def build_distill_parser() -> argparse.ArgumentParser:
    from .forecast import add_distill_args

    parser = argparse.ArgumentParser(prog=f"torchrun ... -m sparsa.train {DISTILL}",
                                     description="SparDA forecast distillation, data-parallel over the ranks")
    add_distill_args(parser)
    _add_common(parser, ("ddp",))
    return parser


def main(argv: list[str] | None = None) -> int:
    from .distributed import distill_distributed, train_distributed

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == DISTILL:
        from .forecast import DistillConfig

        args = build_distill_parser().parse_args(argv[1:])
        fields = {f.name for f in dataclasses.fields(DistillConfig)}
        values = {k: v for k, v in vars(args).items() if k in fields}
        values["progress"] = not args.no_progress
        job, cfg = distill_distributed, DistillConfig(**values)
    else:
        args = build_parser().parse_args(argv)
        job, cfg = train_distributed, train_config_from_args(args)
    try:
        summary = job(cfg, parallel=args.parallel, backend=args.backend)
    except ValueError as err:
        print(f"sparsa.train: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "last"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
