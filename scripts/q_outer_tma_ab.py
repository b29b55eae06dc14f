"""A/B of the query-outer forward with K / V by TMA (SPARSA_Q_OUTER_TMA=1, per (warps, stages)) against the one-token
query tiles (the default at G = 16 before session 29) and the query-outer kernel without TMA, interleaved rounds (GPU).

    PYTHONPATH=. python3 scripts/q_outer_tma_ab.py [--shapes '8192,16;16384,16;65536,16'] [--configs 1x2,1x2n]
        [--rounds 3] [--backward]

A config WxS[n]: W warps, S stages, with q_outer.TMA_SKIP_PADDING on (the default); a trailing 'n': off (padded
slots loaded and masked).

Setup as benchmarks/sparse_attention.py (Hq = 32, D = 128, block 64, top-16, random selections, bf16); each
variant's output is compared with the one-token tiles' (relative norm) before timing. Ends with the median over
rounds per variant.
"""
import argparse
import statistics

import torch

import benchmarks.sparse_attention as sa
from scripts.kl_dispatch_sweep import with_env
from sparsa.ops.sparse_attn import q_outer as qo

VARIANTS_ENV = {"one_token": {"SPARSA_Q_OUTER_TMA": "0", "SPARSA_ONE_TOKEN_TILES": "auto"},
                "q_outer_ptr": {"SPARSA_Q_OUTER_TMA": "0", "SPARSA_ONE_TOKEN_TILES": "0"}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8192,16;16384,16;65536,16")
    ap.add_argument("--configs", default="1x2,1x2n", help="warps x stages of the TMA kernel ('n': no padding skip)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backward", action="store_true", help="also forward+backward")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    variants = dict(VARIANTS_ENV)
    for cfg in args.configs.split(","):
        variants[f"tma_{cfg}"] = {"SPARSA_Q_OUTER_TMA": "1", "config": tuple(int(x) for x in cfg.rstrip("n").split("x")),
                                  "skip": not cfg.endswith("n")}
    times = {}
    for shape in args.shapes.split(";"):
        n, group = (int(x) for x in shape.split(","))
        q, k, v, idx = sa.make(n, group)
        ref = with_env(VARIANTS_ENV["one_token"], lambda: sa.sparsa.sparse_attention(q, k, v, idx, block_size=sa.BS,
                                                                                        loop_order="q_outer"))
        for rnd in range(args.rounds):
            for name, env in variants.items():
                env = dict(env)
                config, skip = env.pop("config", None), env.pop("skip", True)
                saved, saved_skip = qo.TMA_CONFIG, qo.TMA_SKIP_PADDING
                qo.TMA_CONFIG, qo.TMA_SKIP_PADDING = config or saved, skip
                try:
                    def fwd():
                        return sa.sparsa.sparse_attention(q, k, v, idx, block_size=sa.BS, loop_order="q_outer")
                    if rnd == 0:
                        out = with_env(env, fwd)
                        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                        print(f"N={n} G={group} {name}: output vs one-token tiles {err:.2e}", flush=True)
                    f_ms = with_env(env, lambda: sa.time_sparse(q, k, v, idx, "q_outer", False))
                    b_ms = with_env(env, lambda: sa.time_sparse(q, k, v, idx, "q_outer", True)) if args.backward else None
                finally:
                    qo.TMA_CONFIG, qo.TMA_SKIP_PADDING = saved, saved_skip
                times.setdefault((n, group, name), []).append((f_ms, b_ms))
                extra = f" fwd+bwd {b_ms:.3f}" if b_ms is not None else ""
                print(f"round {rnd} N={n} G={group} {name:>12}: fwd {f_ms:.3f} ms{extra}", flush=True)
    print("== medians over rounds (fwd ms [fwd+bwd ms])")
    for (n, group, name), rows in times.items():
        f_med = statistics.median(r[0] for r in rows)
        b_med = statistics.median(r[1] for r in rows) if rows[0][1] is not None else None
        print(f"N={n:>6} G={group:>2} {name:>12}: {f_med:.3f}" + (f" / {b_med:.3f}" if b_med is not None else ""))


if __name__ == "__main__":
    main()
