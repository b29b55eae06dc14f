"""The SSA reproduction pipeline at toy size (checks the pipeline, not the claims)."""
from sparsa.experiments.ssa_repro import claims, run_ssa_reproduction


def test_ssa_reproduction_toy(tmp_path):
    report = tmp_path / "report.md"
    out = run_ssa_reproduction(out=str(tmp_path / "runs"), scale="toy", report=str(report), progress=False)
    assert set(out["results"]) == {"full", "sparse", "ssa"}
    text = report.read_text()
    for claim, _, _ in out["claims"]:
        assert claim in text
    assert (tmp_path / "report.png").exists()
    assert all(v > 0 for v in out["timings"].values())


def test_claims_logic():
    def result(full, sparse, s, e, sweep):
        return {"bpb": {"full": full, "sparse": sparse}, "attn_sparsity": s, "entropy_bits": e,
                "topk_sweep": {str(k): v for k, v in sweep.items()}}
    results = {"full": result(2.0, 2.5, 0.6, 5.0, {2: 2.6, 4: 2.5}),
               "sparse": result(2.2, 2.25, 0.5, 5.5, {2: 2.3, 4: 2.25}),
               "ssa": result(1.9, 1.92, 0.7, 4.0, {2: 2.0, 4: 1.92})}
    verdicts = {c: held for c, held, _ in claims(results)}
    assert all(verdicts.values())
    results["ssa"]["attn_sparsity"] = 0.4
    assert not {c: h for c, h, _ in claims(results)}["SSA has the highest AttnSparsity"]
