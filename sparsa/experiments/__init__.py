"""Experiments: `sparsa experiment ssa` (SSA reproduction at small scale)."""
from __future__ import annotations


def register_cli(sub) -> None:
    from .ssa_repro import add_cli_args, cmd_ssa

    p = sub.add_parser("experiment", help="reproduce a paper's claims (ssa)")
    exp = p.add_subparsers(dest="experiment", required=True)
    q = exp.add_parser("ssa", help="train full / sparse / SSA models on the same tokens and compare")
    add_cli_args(q)
    q.set_defaults(func=cmd_ssa)
