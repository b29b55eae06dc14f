"""benchmarks/plot_sparse_attention.py: reads the benchmark's JSON and printed table, rejects bad input, and
writes its image atomically."""

import json

import pytest

from benchmarks import plot_sparse_attention as plot_mod

LOG = """{'gpu': 'x'}
| N | G | index | fwd q_outer | fwd kv_outer | fwd (auto) | TFLOP/s | fwd+bwd | TFLOP/s | dense fwd | dense fwd+bwd | fwd speedup | fwd+bwd speedup | floor fwd / fwd+bwd |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
| 8K | 1 | 0.26 | 18.16 | 1.40 | 1.40 (kv_outer) | 89 | 3.15 | 139 | 0.95 | 3.67 | 0.7x | 1.2x | 1.01 / 2.37 |
| 64K | 4 | 0.51 | 37.01 | 9.87 | 6.70 (q_tile, waste 1.43) | 158 | 20.12 | 184 | 55.45 | 219.38 | 8.3x | 10.9x | 8.52 / 19.96 |
"""


def test_reads_the_log_and_the_json(tmp_path):
    log = tmp_path / "bench.log"
    log.write_text(LOG)
    rows = plot_mod.read_rows(str(log))
    assert rows == [
        {"N": 8192, "G": 1, "fwd": 1.40, "fwdbwd": 3.15, "dense_fwd": 0.95, "dense_fwdbwd": 3.67},
        {"N": 65536, "G": 4, "fwd": 6.70, "fwdbwd": 20.12, "dense_fwd": 55.45, "dense_fwdbwd": 219.38},
    ]
    js = tmp_path / "bench.json"
    js.write_text(json.dumps({"info": {}, "rows": [{"tune": "x"}, dict(rows[1], index=0.5, auto="q_tile")]}))
    assert plot_mod.read_rows(str(js)) == rows[1:]
    label, both = plot_mod.parse_series(f"pooled P=20={log},{js}")
    assert label == "pooled P=20" and both == rows + rows[1:]


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        plot_mod.read_rows(str(tmp_path / "missing.log"))
    empty = tmp_path / "empty.log"
    empty.write_text("nothing here\n")
    with pytest.raises(ValueError, match="no benchmark rows"):
        plot_mod.read_rows(str(empty))
    with pytest.raises(ValueError, match="LABEL=FILE"):
        plot_mod.parse_series(str(empty))


def test_writes_the_image_and_keeps_the_old_one_on_failure(tmp_path, monkeypatch):
    log = tmp_path / "bench.log"
    log.write_text(LOG)
    out = tmp_path / "speedup.png"
    plot_mod.main([f"random={log}", f"other={log}", "--out", str(out)])
    image = out.read_bytes()
    assert image[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.figure

    def fail(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fail)
    with pytest.raises(RuntimeError):
        plot_mod.main([f"random={log}", "--out", str(out)])
    assert out.read_bytes() == image  # the earlier image is intact, no temporary file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.log", "speedup.png"]
