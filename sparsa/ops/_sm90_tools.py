"""Triton's bundled ptxas and nvdisasm on a kernel compiled for sm_90 without a GPU: the scripts and tests that
read registers, spills and SASS of offline builds (scripts/sa_sm90_build.py, scripts/kv_gluon_build.py,
kl/gluon_fwd.offline_report)."""
from __future__ import annotations

import os
import subprocess
import tempfile


def tool_reports(ptx: str, cubin: bytes | None = None) -> tuple[str, str]:
    """(`ptxas -v -arch=sm_90a` report of `ptx`, `nvdisasm -c` SASS): the SASS of `cubin` when given (the compiled
    kernel's own), else of ptxas's build of the PTX."""
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, built = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.o")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        report = subprocess.run([os.path.join(bindir, "ptxas"), "-v", "-arch=sm_90a", ptx_path, "-o", built],
                                capture_output=True, text=True, check=True).stderr
        if cubin is not None:
            built = os.path.join(tmp, "k.cubin")
            with open(built, "wb") as f:
                f.write(cubin)
        sass = subprocess.run([os.path.join(bindir, "nvdisasm"), "-c", built], capture_output=True, text=True,
                              check=True).stdout
    return report, sass
