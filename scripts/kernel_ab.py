"""A/B of this tree's KV-outer kernels against a baseline's, in one process on one GPU: do_bench medians
of the forward and forward+backward (benchmark inputs, index build included), each side twice, interleaved
(new, old, new, old), and the relative difference of the outputs and gradients.

    mkdir -p .ab_old && for f in kv_outer backward; do
        git show COMMIT:sparsa/ops/sparse_attn/$f.py > .ab_old/$f.py; done     (COMMIT: e.g. 2973361)
    PYTHONPATH=. python3 scripts/kernel_ab.py --old-dir .ab_old [--shapes "65536,4;8192,4"]
        [--kernels kv_outer._kv_fwd_main_kernel,backward._kv_bwd_kernel]

(.ab_old is git-ignored: pass it to the device tool's `carry`.) The baseline modules are loaded from
--old-dir as siblings of the package's modules (their relative imports resolve to this tree), and only
the named kernels are swapped, so the launch code is this tree's: a baseline kernel must take the same
arguments.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.sparse_attention import bench, sparse_calls  # noqa: E402

PACKAGE = "sparsa.ops.sparse_attn"


def load_baseline(old_dir: str, module: str):
    """The baseline's `module` (a file in old_dir) as sparsa.ops.sparse_attn._ab_<module>."""
    path = os.path.join(old_dir, module + ".py")
    if not os.path.isfile(path):
        raise ValueError(f"--old-dir: no {module}.py in {old_dir!r} (see this script's docstring)")
    name = f"{PACKAGE}._ab_{module}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def kernel_pairs(old_dir: str, names: list[str]):
    """[(live module, attribute, this tree's kernel, the baseline's kernel)] for 'module.kernel' names."""
    pairs = []
    for full in names:
        module, _, attr = full.partition(".")
        if not attr:
            raise ValueError(f"--kernels: {full!r} must be MODULE.KERNEL, e.g. kv_outer._kv_fwd_main_kernel")
        live = importlib.import_module(f"{PACKAGE}.{module}")
        pairs.append((live, attr, getattr(live, attr), getattr(load_baseline(old_dir, module), attr)))
    return pairs


def use(pairs, side: int):
    for live, attr, *kernels in pairs:
        setattr(live, attr, kernels[side])


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--old-dir", required=True)
    p.add_argument("--shapes", default="65536,4;8192,4", help="'N,G;N,G'")
    p.add_argument("--kernels", default="kv_outer._kv_fwd_main_kernel,backward._kv_bwd_kernel")
    args = p.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";") if s]
    pairs = kernel_pairs(args.old_dir, [k for k in args.kernels.split(",") if k])
    print(f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'} torch {torch.__version__}",
          flush=True)
    rows = []
    for n, group in shapes:
        fwd, fwd_bwd, leaves = sparse_calls(n, group, "kv_outer")
        times, results = {"new": [], "old": []}, {}
        for side in (0, 1, 0, 1):
            name = ("new", "old")[side]
            use(pairs, side)
            out = fwd()
            fwd_bwd()
            results.setdefault(name, [out.float(), *(x.grad.float() for x in leaves)])
            times[name].append((bench(fwd), bench(fwd_bwd)))
        use(pairs, 0)
        diff = max(rel(a, b) for a, b in zip(results["new"], results["old"]))
        row = {"N": n, "G": group, "new": times["new"], "old": times["old"], "diff": diff}
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    print("\n| N | G | new fwd / fwd+bwd (two runs) | old fwd / fwd+bwd (two runs) | diff |\n|---|---|---|---|---|")
    for r in rows:
        fmt = lambda ts: ", ".join(f"{a:.3f} / {b:.3f}" for a, b in ts)  # noqa: E731
        print(f"| {r['N']} | {r['G']} | {fmt(r['new'])} | {fmt(r['old'])} | {r['diff']:.2e} |")


if __name__ == "__main__":
    main()
