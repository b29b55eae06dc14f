"""Instruction mix of the StreamKL forward kernel's SASS for sm_90, compiled here without a GPU.

    python3 scripts/kl_sass_counts.py [BM BN WARPS STAGES]      (default 128 128 8 2)

Compiles `_kl_fwd_kernel` (bf16, D = 128, causal, same scale both sides; integer arguments marked
divisible by 16 as the runtime specialises them) with Triton's bundled ptxas, disassembles it with
nvdisasm and counts the opcodes of the first key loop (the unmasked tiles): from the last branch
before the first HGMMA to the first branch after it.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparsa.ops.kl import triton_ops


def compile_fwd(bm: int, bn: int, warps: int, stages: int):
    fn = triton_ops._kl_fwd_kernel
    names = fn.arg_names
    ptrs = {"QP": "*bf16", "KP": "*bf16", "QQ": "*bf16", "KQ": "*bf16", "KL": "*fp32", "LSEP": "*fp32",
            "LSEQ": "*fp32", "CU": "*fp32"}
    const = dict(DP=128, DQ=128, BDP=128, BDQ=128, CAUSAL=True, VARLEN=False, ONLY_P=False, SAME_SCALE=True,
                 PREC_P="tf32", PREC_Q="tf32", BM=bm, BN=bn, INTERPRET=False)
    sig = {n: ptrs.get(n, "constexpr" if n in const else ("fp32" if n.startswith("scale") else "i32")) for n in names}
    div = [i for i, n in enumerate(names) if n in ptrs or (n.startswith("s") and not n.startswith("scale"))]
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in div})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def main():
    bm, bn, warps, stages = (int(x) for x in sys.argv[1:5]) if len(sys.argv) >= 5 else (128, 128, 8, 2)
    kernel = compile_fwd(bm, bn, warps, stages)
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    lines = sass.splitlines()
    hgmma = [i for i, line in enumerate(lines) if "HGMMA" in line]
    branches = [i for i, line in enumerate(lines) if re.search(r"\bBRA\b", line) and i > hgmma[0]]
    start = max(i for i, line in enumerate(lines[: hgmma[0]]) if "BRA" in line)
    body = lines[start:branches[0] + 1]
    ops = Counter()
    for line in body:
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if m:
            ops[m.group(1)] += 1
    print(f"_kl_fwd_kernel sm_90, BM={bm} BN={bn} warps={warps} stages={stages}, shared {kernel.metadata.shared} B; "
          f"first loop body ({len(body)} lines), per thread and key tile ({bm}x{bn} scores, 2 GEMMs):")
    for op, n in ops.most_common(12):
        print(f"  {op:10s} {n}")


if __name__ == "__main__":
    main()
