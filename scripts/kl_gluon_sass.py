"""Compiles the Gluon StreamKL forward (sparsa/ops/kl/gluon_fwd.py) for sm_90 without a GPU and reports
registers, spills, shared memory, ptxas warnings and the kernel's opcode mix.

    python3 scripts/kl_gluon_sass.py [BM BN WARPS STAGES [PAIRED [QREG]] | ws [BN [STAGES [QREG]]]]

(default: gluon_fwd.DEFAULT_CONFIG)

SASS_OUT=file also writes the disassembly there.
"""
from __future__ import annotations

import os
import re
import sys
from collections import Counter

from sparsa.ops.kl import gluon_fwd


def main():
    cfg = gluon_fwd._parse_config(",".join(sys.argv[1:])) if len(sys.argv) > 1 else gluon_fwd.DEFAULT_CONFIG
    sass, info, shared = gluon_fwd.offline_report(*cfg)
    print(f"config {cfg} shared {shared} B")
    for line in info.splitlines():
        if "registers" in line or "spill" in line or "arning" in line:
            print("  ", line.strip())
    ops = Counter()
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if m:
            ops[m.group(1)] += 1
    print("  whole-kernel opcodes:", ", ".join(f"{o} {n}" for o, n in ops.most_common(16)))
    if os.environ.get("SASS_OUT"):
        with open(os.environ["SASS_OUT"], "w") as f:
            f.write(sass)


if __name__ == "__main__":
    main()
