"""GPU timing shared by the benchmarks: triton.testing.do_bench medians over enough calls to be medians."""

from __future__ import annotations

import torch

# do_bench repeats a call rep / (its estimated ms) times, so at rep = 60 ms a 45 ms call (128K forward+backward) was
# one sample: the window grows with the call so that every median is over about MIN_SAMPLES calls or more.
MIN_SAMPLES = 7


def window_ms(call_ms: float, rep_ms: float, min_samples: int = MIN_SAMPLES) -> float:
    """do_bench's `rep` for a call of call_ms: rep_ms, or longer so that it holds min_samples calls (do_bench takes
    int(rep / its own estimate); the half call of slack keeps a 7% slower estimate from rounding down to one fewer)."""
    if call_ms < 0 or rep_ms <= 0 or min_samples < 1:
        raise ValueError(f"window_ms: call_ms >= 0, rep_ms > 0 and min_samples >= 1 required, got "
                         f"{call_ms}, {rep_ms}, {min_samples}")
    return max(rep_ms, (min_samples + 0.5) * call_ms)


def median_ms(fn, *, warmup: float = 10, rep: float = 60, grad_to_none=None, min_samples: int = MIN_SAMPLES) -> float:
    """Median ms of fn (CUDA work) by triton.testing.do_bench over a window of max(rep ms, about min_samples calls),
    after one untimed call and one call timed by CUDA events to size the window."""
    import triton

    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    window = window_ms(start.elapsed_time(end), rep, min_samples)
    return triton.testing.do_bench(fn, warmup=warmup, rep=window, grad_to_none=grad_to_none, return_mode="median")
