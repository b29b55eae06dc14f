"""benchmarks/cpu_long_context.py runs end to end at a tiny size and writes its JSON."""
import json
import sys

import pytest

from benchmarks import cpu_long_context


def test_cpu_benchmark_smoke(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["cpu_long_context.py", "--ns", "96", "--repeats", "1", "--out", str(out)])
    cpu_long_context.main()
    rows = json.loads(out.read_text())["rows"]
    assert [r["op"] for r in rows] == list(cpu_long_context.OPS)
    assert all(r["dense_s"] > 0 and r["chunked_s"] > 0 for r in rows)


def test_cpu_benchmark_rejects_bad_arguments(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cpu_long_context.py", "--ops", "sparse,dense"])
    with pytest.raises(ValueError, match="--ops"):
        cpu_long_context.main()
