"""Offline sm_90 build of the selected-block attention kernels (no GPU needed): registers, spills and shared
memory of each kernel at its default launch, bf16, head dim 128, block 64 (--block-size), top-16.

    python3 scripts/sa_sm90_build.py [--groups 4] [--block-size 64] [--head-dim 128]   (not under TRITON_INTERPRET=1)

benchmarks/results/sa_sm90_shared_sweep_cpu.jsonl: head dims 64 / 128 / 256 x blocks 16 / 32 / 64 / 128 x G = 1, 4, 16
(at head dim 256 the backward kernels are listed too; issue 3 asks for that head dim forward only).

One JSON line per (kernel, G): {"kernel", "G", "warps", "registers", "spill_bytes", "stack_bytes", "shared",
"sass_instructions" (static count, nvdisasm)}.
tests/ops/test_sparse_attn_build.py runs it in a subprocess and bounds the spills: a kernel that only
works in the interpreter, or a change that makes a kernel spill, shows up on a CPU machine.
"""
from __future__ import annotations

import argparse
import json
import os
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparsa.ops._sm90_tools import tool_reports
from sparsa.ops.sparse_attn import backward as bwd
from sparsa.ops.sparse_attn import index_triton as ix
from sparsa.ops.sparse_attn import kv_local as kvl
from sparsa.ops.sparse_attn import kv_outer as kv
from sparsa.ops.sparse_attn import locality as loc
from sparsa.ops.sparse_attn import q_outer as qo
from sparsa.ops.sparse_attn import q_tile as qt
from sparsa.ops.sparse_attn import q_tile_backward as qtb

D, BS, TOPK = 128, 64, 16
POINTER_TYPES = {
    "*bf16": {"Q", "K", "V", "O", "OP", "DO", "DQP", "DK", "DVv", "DQ"},
    "*fp32": {"LSE", "LSEP", "DELTA", "DKP", "DVP"},
    "*i32": {"POS", "IDX", "TOKS", "BLKLEN", "LOCALBLK", "UNION", "COUNT", "TILES"},
    "*i64": {"OUT", "WORK", "DOCSTART", "BLOCKBASE", "BLKSTART", "SPLIT", "PERM", "TOKBASE", "TOKDOCSTART"},
    "*i16": {"GID", "SORTED"},
}
FLOAT_ARGS = {"qk_scale", "scale"}
ALIGNED_INTS = {"Hq", "N", "BS"}  # multiples of 16 in the benchmark's setup (Triton specialises them)


def arg_type(name: str) -> str:
    if name in ("KD", "VD"):  # TMA descriptors of K / V viewed as [N, Hkv * D], one block per box (q_tile, q_outer)
        return f"tensordesc<bf16[{BS}, {D}]>"
    for kind, names in POINTER_TYPES.items():
        if name in names:
            return kind
    return "fp32" if name in FLOAT_ARGS else "i32"


def build(kernel, constexprs: dict, warps: int, stages: int = 1, maxnreg: int | None = None) -> dict:
    """ptxas -v of the sm_90a build of `kernel` with the given compile-time constants."""
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else arg_type(n) for n in names}
    aligned = [i for i, n in enumerate(names) if signature[n].startswith("*") or n in ALIGNED_INTS]
    src = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(names.index(n),): v for n, v in constexprs.items()},
        attrs={(i,): [["tt.divisibility", 16]] for i in aligned},
    )
    options = {"num_warps": warps, "num_stages": stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    report, sass = tool_reports(compiled.asm["ptx"])
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, report)) else 0  # noqa: E731
    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_bytes": number(r"(\d+) bytes spill stores"),
        "stack_bytes": number(r"(\d+) bytes stack frame"),
        "shared": compiled.metadata.shared,
        "warps": warps,
        # static SASS instruction count (MAIN has no loop: every work item runs all of them)
        "sass_instructions": len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+\S", sass)),
    }


def kernels(group: int):
    """(name, kernel, constexprs, warps, stages, maxnreg) of every kernel at its default launch for G."""
    common = dict(G=group, D=D, DV=D, BLOCK_D=D, BLOCK_DV=D, PRECISION="tf32")
    block_m, warps, opts = kv.fwd_config(group, D, BS)
    main = dict(common, BLOCK_M=block_m, PAIRS=block_m // group, BLOCK_N=BS,
                EARLY_V=kv.MAIN_EARLY_V, HINTS=kv.cache_hints(group))
    for local in (False, True):
        yield f"kv_main local={local}", kv._kv_fwd_main_kernel, dict(main, LOCAL=local), warps, 1, opts.get("maxnreg")
    for local, (rows, tokens, rwarps) in ((False, kv.reduce_config(group, D)), (True, kv.local_config(group, D))):
        merge = dict(
            common, TOPK=TOPK, BLOCK_R=rows, TOKENS=tokens, BLOCK_N=BS, BLOCK_K=TOPK, LOCAL=local,
            SLOTS=1 if local else kv.reduce_slots(TOPK, rows, D), HINTS=kv.cache_hints(group),
        )
        yield ("kv_local_reduce" if local else "kv_reduce"), kv._kv_fwd_merge_kernel, merge, rwarps, kv.merge_stages(
            local, BS, D), None
    lrows = kvl.local_rows(group, D, BS)
    local = dict(common, TOPK=TOPK, BLOCK_R=lrows, TOKENS=lrows // group, BLOCK_N=BS, BLOCK_K=TOPK)
    yield "kv_local", kvl._kv_local_kernel, local, kvl.local_warps(lrows, D, BS), 2, None
    for keys in (False, True):
        os.environ["SPARSA_KV_BWD_KEYS"] = "1" if keys else "0"
        bm, bwarps, bopts, _ = bwd.bwd_config(group, D, BS)
        dkdv = dict(common, BLOCK_M=bm, PAIRS=bm // group, BLOCK_N=BS, KEYS_AS_ROWS=keys, WRITE_DQ=True)
        yield f"kv_dkdv keys={keys}", bwd._kv_bwd_kernel, dkdv, bwarps, bopts.get("num_stages", 2), None
    os.environ.pop("SPARSA_KV_BWD_KEYS")
    rows, tokens, rwarps = kv.reduce_config(group, D)
    dq = dict(TOPK=TOPK, G=group, D=D, BLOCK_R=rows, TOKENS=tokens, BLOCK_D=D, SLOTS=kv.reduce_slots(TOPK, rows, D))
    yield "dq_reduce", bwd._dq_reduce_kernel, dq, rwarps, 3, None
    branchless, qwarps, qstages = qo.q_outer_config(D)
    qo_const = dict(common, TOPK=TOPK, BLOCK_G=qo._pow2(group), BLOCK_N=BS, BRANCHLESS=branchless,
                    BLOCK_K=qo.next_pow2(TOPK))
    yield "q_outer", qo._q_outer_fwd_kernel, dict(qo_const, TMA=False, SKIP_PADDING=False), qwarps, qstages, None
    twarps_qo, tstages_qo = qo.TMA_CONFIG
    for skip in (True, False):
        yield (f"q_outer tma{'' if skip else ' no-skip'}", qo._q_outer_fwd_kernel, dict(qo_const, TMA=True, SKIP_PADDING=skip),
               twarps_qo, tstages_qo, None)
    rows, tokens, twarps = qt.tile_config(group, D)
    tile = dict(common, TOPK=TOPK, BLOCK_R=rows, TOKENS=tokens, BLOCK_N=BS, BLOCK_K=TOPK)
    yield "q_tile", qt._q_tile_fwd_kernel, tile, twarps, 3, None
    union = dict(TOPK=TOPK, TOKENS=tokens, BLOCK_T=max(1, 1 << (tokens - 1).bit_length()), BLOCK_K=TOPK,
                 MAXU=tokens * TOPK)
    yield "q_tile union", qt._tile_union_kernel, union, 4, 3, None
    for tma in (False, True):
        yield (f"q_tile list{' tma' if tma else ''}", qt._q_tile_list_fwd_kernel, dict(tile, MAXU=tokens * TOPK, TMA=tma),
               twarps, qt.list_stages(BS, D), None)
    block_e = max(16, 1 << (tokens * TOPK - 1).bit_length())
    distinct = dict(TOPK=TOPK, TOKENS=tokens, BLOCK_E=block_e, CHUNK=loc.distinct_chunk(block_e))
    yield "locality distinct", loc._tile_distinct_kernel, distinct, loc.distinct_warps(block_e), 1, None
    for tma in (False, True):
        yield (f"q_tile dq{' tma' if tma else ''}", qtb._tile_dq_kernel, dict(tile, MAXU=tokens * TOPK, TMA=tma),
               qtb.BWD_WARPS, qtb.dq_stages(BS, D), None)
    yield "q_tile dkdv", qtb._tile_dkdv_kernel, tile, qtb.BWD_WARPS, 3, None
    # the pair-index kernels (the default index, index_triton.py) at their launches: 16-bit sort keys
    key = dict(TOPK=TOPK, BLOCK_T=ix.INDEX_BLOCK // TOPK, BLOCK_K=TOPK)
    yield "index pair_key", ix._pair_key_kernel, key, 4, 3, None
    yield "index pair_pos", ix._pair_pos_kernel, dict(TOPK=TOPK, WIDE=False, BLOCK=ix.INDEX_BLOCK), 4, 3, None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--groups", default="4")
    p.add_argument("--block-size", type=int, default=BS, help="keys per block (default 64, the benchmark's)")
    p.add_argument("--head-dim", type=int, default=D, help="head dim (default 128)")
    args = p.parse_args()
    globals()["BS"], globals()["D"] = args.block_size, args.head_dim
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the build needs Triton's compiler")
    for group in (int(g) for g in args.groups.split(",")):
        for name, kernel, constexprs, warps, stages, maxnreg in kernels(group):
            row = {"kernel": name, "G": group, "block": BS, "D": D, **build(kernel, constexprs, warps, stages, maxnreg)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
