"""The automatic loop order's device-dependent choices: which measured GPU a call runs on.

The KV-outer order moves a partial output row per (pair, query head) through DRAM and is bound by that traffic;
the query-outer and query-tile orders are bound by their MMA and softmax work. A GPU with the H100's SMs and faster
memory therefore favours KV-outer. On the H200 (4.8 TB/s against 3.35; session 22,
benchmarks/results/h200_session22/, Hq = 32, head dim 128, block 64, top-16, bf16, random selections):

- at G = 16 the KV-outer forward took 0.94 / 1.87 / 3.76 / 7.66 / 15.44 ms at 8K / 16K / 32K / 64K / 128K
  against the query-outer's 1.18 / 2.32 / 4.64 / 9.26 / 18.82 (on the H100, session 17: 1.15 / 2.34 / 4.78 /
  9.77 / 19.61 against 1.17 / 2.31 / 4.60 / 9.15 / 18.89, so there the query-outer order stays from 32K; from
  20480 tokens since session 26's H100 A/B);
- the query-tile forward's crossover waste against KV-outer (pooled selections, P = 20 and 40, linear between)
  was 2.18 / 2.22 at G = 1 (8K / 64K) and 1.95 / 2.06 at G = 4, 0.79-0.86 of the H100's 2.55 / 2.69 and
  2.36 / 2.62; hence `waste_factor` 0.85 on locality.max_waste.

Session 25 (benchmarks/results/h200_session25/) measured G = 16 with this row on the H200: forward+backward
2.15 / 4.28 / 8.52 / 17.14 / 35.47 ms at 8K-128K, 8-14% below session 22's orders where the order changed.

Other GPUs get the H100's choices (the GPU they were measured on); SPARSA_DEVICE_TUNING forces a table row.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .._env import env_choice


@dataclass(frozen=True)
class DeviceTuning:
    """name: the table row; large_group_kv_outer: G >= 16 takes KV-outer at every size (else query-outer from
    20480 tokens, see triton_ops.choose_loop_order); waste_factor: multiplies locality.max_waste."""

    name: str
    large_group_kv_outer: bool
    waste_factor: float


TUNINGS = {
    "h100": DeviceTuning("h100", large_group_kv_outer=False, waste_factor=1.0),
    "h200": DeviceTuning("h200", large_group_kv_outer=True, waste_factor=0.85),
}


@functools.lru_cache(maxsize=None)
def _tuning_for_name(device_name: str) -> str:
    """The table row for a CUDA device name ("NVIDIA H200" -> h200); h100 for every other GPU."""
    return "h200" if "H200" in device_name.upper() else "h100"


def device_tuning(device: torch.device) -> DeviceTuning:
    """The tuning of `device`: SPARSA_DEVICE_TUNING=h100|h200 if set, else by the CUDA device's name; CPU
    tensors (the Triton interpreter) get h100's."""
    forced = env_choice("SPARSA_DEVICE_TUNING", tuple(TUNINGS), None)
    if forced is not None:
        return TUNINGS[forced]
    if device.type != "cuda":
        return TUNINGS["h100"]
    return TUNINGS[_tuning_for_name(torch.cuda.get_device_name(device))]
