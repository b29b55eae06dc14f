"""CPU dry runs of the GPU probes (scripts/gpu_script_dry_run.py): tiny fp32 shapes in the interpreter, so
that a broken probe fails here rather than on a lent GPU."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBES = [
    ["scripts/kv_variants.py", "--sizes", "48", "--groups", "4", "--fwd", "64x4x96;64x4x0x2", "--bwd", "k;k64x4",
     "--reduce", "16x4", "--flags", "CACHE_HINTS;MAIN_EARLY_V+CACHE_HINTS"],
    ["scripts/kv_local_ab.py", "--sizes", "48", "--groups", "2", "--local", "16x4", "--backward"],
    ["scripts/kv_local_split_ab.py", "--sizes", "48", "--groups", "2", "--accuracy", "--acc-size", "48", "--profile",
     "--rows", "16x4,32x8", "--backward"],
    ["scripts/kv_gluon_ab.py", "--sizes", "48", "--groups", "2", "--programs", "2", "--flags", "none;PIPELINE"],
    ["scripts/kv_overlap_ab.py", "--sizes", "48", "--groups", "2", "--chunks", "2", "--no-dense"],
    ["scripts/sa_kernel_times.py", "--sizes", "48", "--groups", "4", "--calls", "1"],
    ["scripts/locality_bench.py", "--ns", "48", "--gs", "2", "--pools", "0,2", "--walk", "--tiles", "16x8", "--own-backward"],
    ["scripts/sa_host_overhead.py", "--sizes", "48", "--groups", "4", "--profile", "48,4", "--calls", "1"],
    ["scripts/pooled_bwd_kernels.py", "--sizes", "64", "--groups", "2", "--pool", "6", "--calls", "1"],
    ["scripts/order_ab.py", "--shapes", "48,4", "--orders", "q_outer,auto", "--env", "SPARSA_ONE_TOKEN_TILES=0,auto",
     "--rounds", "1"],
    ["scripts/one_token_bwd_probe.py", "--sizes", "48", "--group", "4", "--rounds", "1", "--calls", "1",
     "--state-calls", "1"],
    ["scripts/gather_floor.py", "--ns", "48", "--gs", "2,8"],
    ["scripts/q_outer_tma_ab.py", "--shapes", "48,4", "--configs", "2x3,1x2n", "--rounds", "1", "--backward"],
    ["scripts/kv_ws_probe.py", "--kernel", "bwd", "--sizes", "48", "--groups", "4", "--rounds", "1", "--calls", "1"],
]


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: os.path.basename(p[0]))
def test_gpu_probe_runs_on_cpu(probe):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_script_dry_run.py"), *probe],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "error" not in out.stdout.lower(), out.stdout[-3000:]


def test_kernel_ab_runs_on_cpu_against_a_copy_of_this_tree(tmp_path):
    """scripts/kernel_ab.py with this tree's own modules as the baseline: both sides run, equal results."""
    import shutil

    for name in ("kv_outer", "backward"):
        shutil.copy(os.path.join(ROOT, "sparsa", "ops", "sparse_attn", name + ".py"), tmp_path / (name + ".py"))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    probe = ["scripts/kernel_ab.py", "--old-dir", str(tmp_path), "--shapes", "48,4"]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_script_dry_run.py"), *probe],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| 48 | 4 |" in out.stdout and "0.00e+00" in out.stdout, out.stdout[-3000:]


def test_gpu_check_names_match_its_steps():
    """Every step gpu_check.sh lists (header and opt-in list) has a `step NAME` line, and every step is listed:
    a step line lost in an edit would otherwise make `--only NAME` a silent no-op on a lent GPU."""
    import re

    text = open(os.path.join(ROOT, "scripts", "gpu_check.sh")).read()
    defined = set(re.findall(r"^step (\w+) ", text, flags=re.M))
    header = " ".join(line[1:] for line in text.splitlines()[:9] if line.startswith("#"))
    listed = set(re.findall(r"\b([a-z][a-z0-9]*_[a-z0-9_]+)\b", header.split("Steps (NAME):", 1)[1].split("Logs go")[0]))
    opt_in = set(re.search(r'-eq 0 \] && \[\[ " ([^"]+) " =~', text).group(1).split())
    assert opt_in <= listed, sorted(opt_in - listed)
    assert listed == defined, (sorted(listed - defined), sorted(defined - listed))


def test_with_flags_sets_module_flags_then_runs_the_script(tmp_path):
    """scripts/with_flags.py: bool flags of a module set (and one turned off with =0) before the script runs with its
    own arguments; a name that is not a bool flag stops it."""
    script = tmp_path / "show.py"
    script.write_text("import sys\nfrom sparsa.ops.sparse_attn import kv_gluon\n"
                      "print('flags', kv_gluon.TMA_STORE, kv_gluon.PIPELINE, sys.argv[1:])\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = [sys.executable, os.path.join(ROOT, "scripts", "with_flags.py"), "sparsa.ops.sparse_attn.kv_gluon"]
    out = subprocess.run([*run, "TMA_STORE+PIPELINE=0", str(script), "--x", "1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "flags True False ['--x', '1']" in out.stdout
    bad = subprocess.run([*run, "ROWS", str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "not a bool flag" in bad.stderr


BENCH_DRY_RUN = """
import sys
max_waste = float(sys.argv[-1])
sys.argv = ["scripts/gpu_script_dry_run.py", "/dev/null"]
__file__ = sys.argv[0]
exec(open("scripts/gpu_script_dry_run.py").read().split("script = sys.argv[1]")[0])
import benchmarks.sparse_attention as b
from sparsa.ops.sparse_attn import locality
locality.DEVICES, locality.MIN_TOKENS = ("cpu",), 64
locality.max_waste = lambda group, tma=True, factor=1.0, q_outer_tma=False: max_waste
b.matmul_rate = b.memory_rate = b.time_reference = lambda *a: 1.0
sys.argv = ["benchmarks/sparse_attention.py", "--ns", "128", "--gs", "4", "--pool", "1"]
b.main()
"""


@pytest.mark.parametrize("max_waste, order", [(100.0, "q_tile"), (0.5, "q_outer")])
def test_benchmark_names_the_order_the_default_took(max_waste, order):
    """benchmarks/sparse_attention.py --pool (dry run): the table names the loop order that the timed default
    call took, q_tile when the locality check accepts the selection, the size rule's order when it does not."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", BENCH_DRY_RUN, str(max_waste)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 0K | 4 |")]
    assert len(rows) == 1 and f"({order}, waste" in rows[0], out.stdout[-2000:]


def test_order_ab_summary_gives_medians_ranges_and_wins():
    """scripts/order_ab.py's closing table: per shape and variant the median over rounds, the range, and the rounds in
    which that variant was fastest (fwd+bwd missing under --no-backward)."""
    import importlib.util
    import sys as _sys

    _sys.path.insert(0, ROOT)
    spec = importlib.util.spec_from_file_location("order_ab", os.path.join(ROOT, "scripts", "order_ab.py"))
    order_ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(order_ab)

    def row(rnd, order, value, fwd, fb):
        return {"N": 64, "G": 4, "round": rnd, "order": order, "env": "X", "value": value, "fwd": fwd, "fwdbwd": fb}

    rows = [row(0, "q_outer", "0", 1.0, 3.0), row(0, "q_outer", "1", 2.0, 2.5),
            row(1, "q_outer", "0", 1.5, 2.0), row(1, "q_outer", "1", 1.2, 2.2),
            row(2, "q_outer", "0", 0.9, 4.0), row(2, "q_outer", "1", 1.1, 3.9)]
    table = order_ab.summary(rows).splitlines()
    assert table[2] == "| 64 | 4 | q_outer X=0 | 3 | 1.000 (0.900-1.500) | 2/3 | 3.000 (2.000-4.000) | 1/3 |"
    assert table[3] == "| 64 | 4 | q_outer X=1 | 3 | 1.200 (1.100-2.000) | 1/3 | 2.500 (2.200-3.900) | 2/3 |"
    no_bwd = order_ab.summary([{**r, "fwdbwd": None} for r in rows]).splitlines()
    assert no_bwd[2].endswith("| 2/3 | - | - |")


def test_sparse_attention_benchmark_rejects_a_directory_as_out(tmp_path):
    """--out names the JSON file; a directory is a ValueError before anything is timed (no GPU needed)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sparse_attention.py"), "--out",
                          str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "ValueError: --out" in out.stderr, out.stderr[-2000:]
