"""Two-process training on CPU (torchrun, gloo) equals single-process training with the same global batch.

One torchrun launch (this file run as a script on 2 ranks) trains with DDP, with FSDP2 (stopping half way)
and resumes a single-process checkpoint with FSDP2; the tests compare with single-process runs of
2 x the per-rank batch, and resume the FSDP2 checkpoint on one process.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # when torchrun runs this file as a script
    sys.path.insert(0, str(ROOT))

from sparsa.cli import main as main_cli
from sparsa.train import TrainConfig, train
from sparsa.train.ssa import read_metrics, shard_batch

WORLD = 2
PER_RANK = 2
HAVE_FORECAST = (ROOT / "sparsa" / "train" / "forecast.py").exists()
COMMON = {"preset": "tiny", "method": "ssa", "steps": 4, "seq_len": 64, "topk": 2, "grad_accum": 2, "eval_every": 2,
          "eval_batches": 1, "warmup_steps": 2, "progress": False}


DISTILL_ARGS = ["--steps", "3", "--batch-size", "1", "--seq-len", "64", "--eval-every", "3", "--eval-batches", "1",
                "--save-every", "2", "--no-progress"]


def make_corpus(folder: Path) -> Path:
    rng = random.Random(0)
    words = ["the", "of", "and", "to", "a", "in", "that", "is", "was", "he", "for", "it", "with", "as", "his", "on", "be", "at", "by", "this", "had", "not", "are", "but", "from", "or", "have", "an", "they", "which", "one", "you", "were", "her", "all", "she", "there", "would", "their", "we", "him", "been", "has", "when", "who", "will"]
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(12):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(300, 900)))
        (folder / f"doc{d:02d}.txt").write_text(text + "\n")
    return folder


def cfg(out: Path, data: Path, batch_size: int, **kw) -> TrainConfig:
    return TrainConfig(out=str(out), data=str(data), batch_size=batch_size, **{**COMMON, **kw})


def cli_args(out: Path, data: Path, parallel: str, *extra: str) -> list[str]:
    c = COMMON
    return ["--out", str(out), "--data", str(data), "--batch-size", str(PER_RANK), "--parallel", parallel,
            "--preset", c["preset"], "--method", c["method"], "--steps", str(c["steps"]), "--seq-len", str(c["seq_len"]),
            "--topk", str(c["topk"]), "--grad-accum", str(c["grad_accum"]), "--eval-every", str(c["eval_every"]),
            "--eval-batches", str(c["eval_batches"]), "--warmup-steps", str(c["warmup_steps"]), "--no-progress", *extra]


def records(folder: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(Path(folder) / "metrics.jsonl") if r["kind"] == kind]


def assert_same_run(got: Path, want: Path, rel=1e-5):
    got_train, want_train = records(got, "train"), records(want, "train")
    assert [r["step"] for r in got_train] == [r["step"] for r in want_train]
    assert [r["modes"] for r in got_train] == [r["modes"] for r in want_train]
    for key in ("ce", "align", "grad_norm"):
        assert [r[key] for r in got_train] == pytest.approx([r[key] for r in want_train], rel=rel, abs=1e-7), key
    got_eval, want_eval = records(got, "eval"), records(want, "eval")
    assert [r["step"] for r in got_eval] == [r["step"] for r in want_eval]
    for key in ("val_bpb_full", "val_bpb_sparse"):
        assert [r[key] for r in got_eval] == pytest.approx([r[key] for r in want_eval], rel=rel), key


def assert_close_weights(a: Path, b: Path, atol=1e-5):
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(wa) == sorted(wb)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=atol, msg=name)


# ---------------------------------------------------------------------------------------------------
# the torchrun worker (this file run as a script on every rank)

def worker(work: Path) -> None:
    import torch.distributed as dist

    import sparsa.checkpoint
    import sparsa.train.ssa
    from sparsa.train.__main__ import main

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    writes = []
    for module in (sparsa.checkpoint, sparsa.train.ssa):
        def counted(path, write, _inner=module.atomic_write):
            writes.append(str(path))
            return _inner(path, write)
        module.atomic_write = counted
    data = work / "data"
    assert main(cli_args(work / "ddp", data, "ddp")) == 0
    assert main(cli_args(work / "fsdp_half", data, "fsdp", "--stop-after", "2")) == 0
    assert main(cli_args(work / "from_single", data, "fsdp", "--resume")) == 0
    if HAVE_FORECAST:
        assert main(["distill-forecast", str(work / "single"), "--out", str(work / "distill"), "--grad-accum", "1",
                     *DISTILL_ARGS, "--data", str(data)]) == 0
    (work / f"writes{rank}.json").write_text(json.dumps(writes))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("dist")
    data = make_corpus(work / "data")
    # the reference: one process, WORLD * PER_RANK rows; its step-2 checkpoint is resumed on 2 ranks
    train(cfg(work / "single", data, WORLD * PER_RANK, stop_after=2))
    shutil.copytree(work / "single", work / "from_single")
    train(cfg(work / "single", data, WORLD * PER_RANK, resume=True))  # exact (tests/test_train.py)
    if HAVE_FORECAST:  # single-process distillation with WORLD x the micro-batches of a rank
        assert main_cli(["distill-forecast", str(work / "single"), "--out", str(work / "distill_single"),
                         "--grad-accum", str(WORLD), *DISTILL_ARGS, "--data", str(data)]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
         str(Path(__file__).resolve()), str(work)],
        env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return work


def test_ddp_two_ranks_equal_single_process(runs):
    assert_same_run(runs / "ddp", runs / "single")
    assert_close_weights(runs / "ddp", runs / "single")


def test_fsdp_checkpoint_resumes_on_one_process(runs):
    half = records(runs / "fsdp_half", "train")
    assert [r["step"] for r in half] == [0, 1]
    assert [r["ce"] for r in half] == pytest.approx([r["ce"] for r in records(runs / "single", "train")[:2]], rel=1e-5)
    train(cfg(runs / "fsdp_half", runs / "data", WORLD * PER_RANK, resume=True))  # world size 1
    assert_same_run(runs / "fsdp_half", runs / "single")
    assert_close_weights(runs / "fsdp_half", runs / "single")


def test_single_process_checkpoint_resumes_on_two_fsdp_ranks(runs):
    assert_same_run(runs / "from_single", runs / "single")
    assert_close_weights(runs / "from_single", runs / "single")


def test_checkpoints_written_once_in_single_process_format(runs):
    rank0 = json.loads((runs / "writes0.json").read_text())
    rank1 = json.loads((runs / "writes1.json").read_text())
    assert rank1 == []
    for run in ("ddp", "fsdp_half", "from_single"):
        assert any(p.endswith(f"{run}/trainer_state.json") for p in rank0), run
        files = sorted(p.name for p in (runs / run).iterdir())
        assert files == ["config.json", "loss.png", "metrics.jsonl", "model.safetensors", "optimizer.pt",
                         "trainer_state.json"], files  # no temporary file left behind
        steps = [r["step"] for r in records(runs / run, "train")]
        assert steps == sorted(set(steps))  # metrics appended by one rank only
    for run in ("ddp", "from_single"):  # (fsdp_half may have been resumed on one process by now)
        meta = json.loads((runs / run / "config.json").read_text())
        assert meta["distributed"] == {"parallel": "ddp" if run == "ddp" else "fsdp", "world_size": WORLD,
                                       "global_batch_size": WORLD * PER_RANK}
    single = torch.load(runs / "single" / "optimizer.pt", weights_only=False)
    for run in ("ddp", "from_single"):
        state = torch.load(runs / run / "optimizer.pt", weights_only=False)
        assert state["step"] == single["step"] == COMMON["steps"]
        assert state["optimizer"]["param_groups"] == single["optimizer"]["param_groups"]
        assert state["optimizer"]["state"].keys() == single["optimizer"]["state"].keys()
        for index, values in single["optimizer"]["state"].items():
            for key, value in values.items():
                torch.testing.assert_close(state["optimizer"]["state"][index][key], value, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not HAVE_FORECAST, reason="sparsa.train.forecast is not part of this tree")
def test_forecast_distillation_on_two_ranks_equals_single_process(runs):
    got = read_metrics(runs / "distill" / "forecast_metrics.jsonl")
    want = read_metrics(runs / "distill_single" / "forecast_metrics.jsonl")
    got_train, want_train = [r for r in got if r["kind"] == "train"], [r for r in want if r["kind"] == "train"]
    assert [r["step"] for r in got_train] == [r["step"] for r in want_train] == [0, 1, 2]
    for g, w in zip(got_train, want_train):
        for key in ("loss", "grad_norm", "layer_loss"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-9), key
    got_eval = {r["step"]: r for r in got if r["kind"] == "eval"}
    want_eval = {r["step"]: r for r in want if r["kind"] == "eval"}
    assert 3 in got_eval and 3 in want_eval
    for step in set(got_eval) & set(want_eval):
        assert got_eval[step]["recall"] == pytest.approx(want_eval[step]["recall"], abs=0.02)
    assert_close_weights(runs / "distill", runs / "distill_single", atol=1e-6)
    assert (runs / "distill" / "forecast_state.json").exists()
    assert json.loads((runs / "distill" / "config.json").read_text())["forecast"] is True


@pytest.mark.skipif(not HAVE_FORECAST, reason="sparsa.train.forecast is not part of this tree")
def test_distill_runtime_hooks():
    """One loop (`run_distill`) for one process and for ranks: the single-process hooks are identities,
    the distributed runtime only adds the gradient mean (the two-rank run above checks the numbers)."""
    from sparsa.train.distributed import DistributedDistillRuntime, DistributedRuntime
    from sparsa.train.forecast import DistillConfig, DistillRuntime

    rt = DistillRuntime(torch.device("cpu"))
    c = DistillConfig(checkpoint="", grad_accum=3)
    assert (rt.rank, rt.world_size, rt.is_main) == (0, 1, True)
    assert [rt.micro_batch_index(c, m) for m in range(3)] == [0, 1, 2]
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    grad = p.grad
    rt.average_grads([p])
    assert p.grad is grad
    assert rt.sum_over_ranks([0.5, 0.25]) == [0.5, 0.25]
    assert issubclass(DistributedDistillRuntime, DistributedRuntime)
    assert "micro_batch_index" not in vars(DistributedDistillRuntime)  # rank * grad_accum + m, shared
    with pytest.raises(ValueError, match="process group"):
        DistributedDistillRuntime(torch.device("cpu"))


def test_rank_slices_make_the_single_process_batch(tmp_path):
    from sparsa.data import TokenStream, random_batch

    stream = TokenStream.from_texts(["abcdefghij" * 20, "klmnopqrst" * 15, "uvwxyz" * 30], tokenizer=_Bytes())
    whole = random_batch(stream, 6, 32, [5, 11, 2, 1, 0])
    parts = [shard_batch(stream, 2, 32, [5, 11, 2, 1, 0], rank, 3) for rank in range(3)]
    assert torch.equal(torch.cat([p.tokens for p in parts], 1), whole.tokens)
    assert torch.equal(torch.cat([p.targets for p in parts], 1), whole.targets)
    offsets = torch.cumsum(torch.tensor([0] + [p.tokens.shape[1] for p in parts[:-1]]), 0)
    bounds = torch.unique(torch.cat([p.cu_seqlens.long() + o for p, o in zip(parts, offsets)]))
    assert torch.equal(bounds, whole.cu_seqlens.long())
    assert torch.equal(shard_batch(stream, 6, 32, [1, 2], 0, 1).tokens, random_batch(stream, 6, 32, [1, 2]).tokens)
    with pytest.raises(ValueError, match="rank"):
        shard_batch(stream, 2, 32, [1], 3, 3)


def test_bad_parallel_and_single_process_fallback(tmp_path, monkeypatch):
    from sparsa.train.__main__ import main
    from sparsa.train.distributed import train_distributed

    with pytest.raises(ValueError, match="parallel"):
        train_distributed(TrainConfig(out=str(tmp_path / "x")), parallel="zero3")
    with pytest.raises(SystemExit):
        main(["--parallel", "zero3"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data = make_corpus(tmp_path / "data")
    assert main(cli_args(tmp_path / "one", data, "fsdp", "--steps", "1", "--eval-every", "1")) == 0
    assert len(records(tmp_path / "one", "train")) == 1


class _Bytes:
    def encode(self, text):
        return list(text.encode())


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
