"""Offline sm_90 build of the Gluon KV-outer MAIN (sparsa/ops/sparse_attn/kv_gluon.py) or, with --kernel bwd, of the
Gluon dK/dV (kv_gluon_bwd.py), or with --kernel ws of the warp-specialised MAIN (kv_gluon_ws.py), no GPU needed: one JSON
line per (G, head dim) with registers, spill bytes, shared memory and SASS counts of the instructions the kernel
is built around (HGMMA wgmma, UTMALDG TMA loads, LDGSTS cp.async gathers, UTMASTG TMA stores), with the module's
flags (TMA_STORE, OFFSETS_I32, PIPELINE from kv_gluon.PIPELINE_MIN_GROUP). benchmarks/results/kv_gluon_build_cpu.jsonl
is its output for G = 1, 2, 3, 4, 8, 16 at D = 64 and 128 (kv_gluon_bwd_build_cpu.jsonl: --kernel bwd).

    python3 scripts/kv_gluon_build.py [--kernel main|bwd|ws] [--groups 1,3,4,16] [--dims 64,128]
    (not under TRITON_INTERPRET=1)
"""
from __future__ import annotations

import argparse
import json
import os
import re

from sparsa.ops._sm90_tools import tool_reports
from sparsa.ops.sparse_attn import kv_gluon, kv_gluon_bwd, kv_gluon_ws


def report(group: int, d: int, which: str = "main", write_dq: bool = True) -> dict:
    if which == "main":
        kernel = kv_gluon.compile_offline(group, d)
    elif which == "ws":
        kernel = kv_gluon_ws.compile_offline(group, d)
    else:
        kernel = kv_gluon_bwd.compile_offline(group, d, write_dq)
    info, sass = tool_reports(kernel.asm["ptx"], kernel.asm["cubin"])
    return {
        "G": group,
        "D": d,
        "kernel": ("dkdv" if write_dq else "dkdv_no_dq") if which == "bwd"
        else "ws" if which == "ws" else "pipeline" if kv_gluon.uses_pipeline(group) else "loop",
        "sass_instructions": len(re.findall(r"/\*[0-9a-f]{4}\*/\s+\S", sass)),
        "registers": int(re.search(r"Used (\d+) registers", info).group(1)),
        "spill_bytes": int(re.search(r"(\d+) bytes spill stores", info).group(1)),
        "shared": kernel.metadata.shared,
        "hgmma": len(re.findall(r"\bHGMMA\.", sass)),
        "utmaldg": len(re.findall(r"\bUTMALDG\b", sass)),
        "ldgsts": len(re.findall(r"\bLDGSTS\b", sass)),
        "tma_stores": len(re.findall(r"\bUTMASTG\b", sass)),
        "setmaxnreg": [int(x) for x in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", kernel.asm["ptx"])],
    }


def main():
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the build needs Triton's compiler")
    p = argparse.ArgumentParser()
    p.add_argument("--kernel", choices=("main", "bwd", "ws"), default="main")
    p.add_argument("--groups", default="1,3,4,16")
    p.add_argument("--dims", default="64,128")
    p.add_argument("--flags", default="", help="kv_gluon flags to turn on first, '+'-joined (CONTIG+KV_REUSE)")
    p.add_argument("--no-dq", action="store_true", help="bwd: the dK/dV-only variant (WRITE_DQ=False, the hybrid backward)")
    args = p.parse_args()
    for name in filter(None, args.flags.split("+")):
        if not isinstance(getattr(kv_gluon, name, None), bool):
            raise SystemExit(f"--flags: {name!r} is not a kv_gluon flag")
        setattr(kv_gluon, name, True)
    for d in (int(x) for x in args.dims.split(",")):
        for group in (int(g) for g in args.groups.split(",")):
            print(json.dumps(report(group, d, args.kernel, not args.no_dq)), flush=True)


if __name__ == "__main__":
    main()
