"""benchmarks/timing.py: the do_bench window holds about MIN_SAMPLES calls of a slow call."""
import pytest

from benchmarks.timing import MIN_SAMPLES, window_ms


def test_window_keeps_rep_for_fast_calls_and_grows_for_slow_ones():
    assert window_ms(0.5, 60) == 60  # 120 calls fit the default window
    assert int(window_ms(45.0, 60) / 45.0) == MIN_SAMPLES  # 128K forward+backward: 7 calls, not 1
    assert int(window_ms(45.0, 60) / 48.0) == MIN_SAMPLES  # do_bench's estimate 6% above the timed call
    assert window_ms(45.0, 60, min_samples=3) == pytest.approx(157.5)
    assert window_ms(0.0, 40) == 40


@pytest.mark.parametrize("args, name", [((-1.0, 60), "call_ms"), ((1.0, 0), "rep_ms"), ((1.0, 60, 0), "min_samples")])
def test_window_rejects_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        window_ms(*args)
