"""Host-side integer helpers for kernel launches (grids, tile sizes, tuning keys).

Plain Python on purpose: `triton.cdiv` and `triton.next_power_of_2` are constexpr functions in Triton
3.6 and cost several microseconds per host call, and grids are evaluated on every launch.
"""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for b > 0."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << (max(int(n), 1) - 1).bit_length()
