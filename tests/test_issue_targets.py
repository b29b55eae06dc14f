"""benchmarks/issue_targets.py: issue 3's targets judged on benchmark rows (committed H100 results and edge cases)."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks.issue_targets import check_targets, format_targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(ROOT, "benchmarks", "results", "h100_session30", "bench_sparse_attn.json")


def row(n, group, fwd, fwdbwd, dense_fwd=1.0, dense_fwdbwd=3.0, tflops=100.0):
    return {"N": n, "G": group, "fwd": fwd, "fwdbwd": fwdbwd, "dense_fwd": dense_fwd, "dense_fwdbwd": dense_fwdbwd,
            "tflops_fwd": tflops}


def test_session30_sweep_meets_50_of_64():
    with open(SWEEP) as f:
        data = json.load(f)
    results = check_targets(data["rows"], data["info"]["bf16_matmul_tflops"])
    missed = {(r["target"].split(" (")[0], r["N"] // 1024, r["G"]) for r in results if not r["met"]}
    assert len(results) == 64 and len(missed) == 14
    assert {("forward faster than dense SDPA", 8, g) for g in (1, 2, 4, 8)} <= missed
    assert ("forward faster than dense SDPA", 8, 16) not in missed  # the TMA query-outer kernel (session 29)
    assert {("forward+backward 3x the best public kernel", n, g) for n in (16, 64) for g in (8, 16)} <= missed
    assert ("forward at 64K G = 4", 64, 4) in missed
    assert not any(t.startswith("forward+backward faster") for t, _, _ in missed)


def test_bounds_and_edges():
    results = check_targets([row(4096, 4, 9.0, 9.0),  # below 8K: not judged
                             row(16384, 4, 1.0, 22.8 / 3),  # exactly 3x the anchor: met
                             row(65536, 4, 4.0, 28.0, dense_fwd=4.0, dense_fwdbwd=200.0, tflops=320.0)], 800.0)
    by = {(r["target"].split(" (")[0], r["N"]): r for r in results}
    assert all(n >= 8192 for _, n in by)
    assert by["forward+backward 3x the best public kernel", 16384]["met"]
    assert not by["forward faster than dense SDPA", 65536]["met"]  # equal to dense is not faster
    assert by["forward at 64K G = 4", 65536]["met"]  # at the bound: met
    assert not by["forward above 40% of the bf16 matmul rate", 65536]["met"]  # 320 of 800 is not above 40%
    text = format_targets(results, "NVIDIA H200")
    assert text.startswith("(the anchors were measured on an H100") and "1 of 1" in text
    with pytest.raises(ValueError, match="matmul_tflops"):
        check_targets([], 0.0)


def test_cli_reads_a_benchmark_json_and_rejects_others(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = os.path.join(ROOT, "benchmarks", "issue_targets.py")
    out = subprocess.run([sys.executable, script, SWEEP], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "issue 3 targets: 50 of 64" in out.stdout, out.stderr[-2000:]
    other = tmp_path / "other.json"
    other.write_text('{"rows": []}')
    bad = subprocess.run([sys.executable, script, str(other)], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "bf16_matmul_tflops" in bad.stderr


def test_auto_gaps_flag_the_session32_8k_rows():
    """benchmarks/sparse_attention.auto_gaps on session 32's sweep: the automatic forward over 5% slower than the same
    order forced at 8K G = 2, 4 and 8 only (1.278 vs 1.150, 1.153 vs 1.066, 1.167 vs 1.052 ms)."""
    from benchmarks.sparse_attention import auto_gaps

    with open(os.path.join(ROOT, "benchmarks", "results", "h100_session32", "bench_sparse_attn.json")) as f:
        rows = json.load(f)["rows"]
    gaps = auto_gaps(rows)
    assert [(g["N"], g["G"], g["order"]) for g in gaps] == [(8192, 2, "kv_outer"), (8192, 4, "kv_outer"),
                                                            (8192, 8, "kv_outer")]
    assert all(g["auto_ms"] > 1.05 * g["forced_ms"] for g in gaps)
    assert auto_gaps([row(8192, 4, 1.0, 3.0) | {"auto": "kv_outer", "fwd_kv_outer": 0.96}]) == []  # within 5%
