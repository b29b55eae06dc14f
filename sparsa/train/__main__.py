"""`torchrun --standalone --nproc-per-node N -m sparsa.train [--parallel ddp|fsdp] [flags of sparsa train]`.

Without torchrun (`python -m sparsa.train ...`) it trains on one process, as `sparsa train` does.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..cli import add_train_args, train_config_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchrun ... -m sparsa.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser)
    parser.add_argument("--parallel", default="ddp", choices=("ddp", "fsdp"),
                        help="DistributedDataParallel or FSDP2 fully_shard (default: ddp)")
    parser.add_argument("--backend", default=None, help="process group backend (default: nccl on CUDA, gloo on CPU)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .distributed import train_distributed

    args = build_parser().parse_args(argv)
    try:
        summary = train_distributed(train_config_from_args(args), parallel=args.parallel, backend=args.backend)
    except ValueError as err:
        print(f"sparsa.train: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "last"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
