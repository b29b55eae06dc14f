"""CPU dry run of a GPU probe that takes its inputs from benchmarks/sparse_attention.py (`make`, `bench`):
tiny fp32 shapes in the Triton interpreter, one call per "benchmark", no timing. Catches a broken script
before it costs GPU time.

    python3 scripts/gpu_script_dry_run.py scripts/kv_variants.py --sizes 64 --groups 1,4 --bwd "k;32x4"

Works for kv_variants.py, kv_local_ab.py, sa_kernel_times.py, sa_host_overhead.py, index_ab.py, kernel_ab.py, order_ab.py, one_token_bwd_probe.py,
pooled_bwd_kernels.py, gather_floor.py and q_outer_tma_ab.py
(tests/test_gpu_scripts.py).
"""
import os
import runpy
import sys

os.environ["TRITON_INTERPRET"] = "1"
os.environ["SPARSA_BACKEND"] = "triton"
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmarks.sparse_attention as b  # noqa: E402
from sparsa.ops.sparse_attn.index import pooled_selection, random_selection  # noqa: E402

b.HQ, b.D, b.BS, b.TOPK = 8, 16, 16, 4


def make(n, group, seed=0, pool=0):
    hkv = b.HQ // group
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, n, b.HQ, b.D, generator=g)
    k = torch.randn(1, n, hkv, b.D, generator=g)
    v = torch.randn(1, n, hkv, b.D, generator=g)
    gen = torch.Generator().manual_seed(seed)
    if pool:
        return q, k, v, pooled_selection(n, hkv, b.TOPK, b.BS, pool, tile=32, generator=gen)
    return q, k, v, random_selection(1, n, hkv, b.TOPK, b.BS, generator=gen)


b.make = make
b.bench = lambda fn, grad_to_none=None: (fn(), 1.0)[1]
b.time_dense = lambda n: (1.0, 1.0)
b.memory_rate = lambda: 1000.0
torch.cuda.get_device_name = lambda *a: "cpu (dry run)"
torch.cuda.synchronize = lambda *a: None
torch.cuda.empty_cache = lambda *a: None
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
