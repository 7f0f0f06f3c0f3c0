"""``--device cuda``: what the hardware allows, measured in the same run (``kind: "ceiling"``).

Rows, per item of the workload's size, each copy synchronised before its clock stops:

* ``cuda-pinned`` / ``save``: device to a reused pinned host buffer (what a save must do first);
* ``cuda-pinned`` / ``load``: pinned host buffer to device (what a load must do last);
* ``cuda-pinned`` / ``roundtrip``: the two in sequence;
* ``cuda-d2d`` / ``load``: device to device, the bound for a backend that lands bytes straight
  in GPU memory (``zero_copy_device``).

A backend's CUDA rows are bounded by these: a store on the host cannot save faster than
``cuda-pinned`` save nor load faster than its load.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ectransfer.bench.runner import Measured
from ectransfer.bench.workload import Workload

__all__ = ["measure_ceilings"]

_REPS_MAX = 64


def _timed(copy: Callable[[], object], reps: int) -> tuple[list[float], float]:
    copy()  # warm-up
    torch.cuda.synchronize()
    times = []
    start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        copy()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times, time.perf_counter() - start


def measure_ceilings(workload: Workload) -> list[Measured]:
    """Pinned D2H/H2D and D2D copies of one item, ``min(count, 64)`` times each."""
    n = workload.item_bytes
    reps = min(workload.count, _REPS_MAX)
    dev = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
    dev2 = torch.empty_like(dev)
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    d2h, d2h_wall = _timed(lambda: pinned.copy_(dev, non_blocking=True), reps)
    h2d, h2d_wall = _timed(lambda: dev2.copy_(pinned, non_blocking=True), reps)
    if not torch.equal(dev, dev2):
        raise RuntimeError("ceiling copies did not round-trip the bytes")
    d2d, d2d_wall = _timed(lambda: dev2.copy_(dev), reps)
    pinned_rows = Measured("cuda-pinned", "ceiling", d2h, list(d2h), h2d, d2h_wall, h2d_wall)
    d2d_rows = Measured("cuda-d2d", "ceiling", [], [], d2d, 0.0, d2d_wall)
    return [pinned_rows, d2d_rows]
