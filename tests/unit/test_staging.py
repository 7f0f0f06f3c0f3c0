"""Staging pool bookkeeping (runs without a GPU: the same code paths on plain host memory)."""

from __future__ import annotations

import threading

import pytest
import torch

from ectransfer import CapacityError, TransferTimeoutError
from ectransfer.connector.staging import StagingPool, host_view, to_device_async, to_host_async


def test_buffers_are_reused_not_reallocated() -> None:
    pool = StagingPool(64 << 20, pin=False)
    ptrs = set()
    for _ in range(20):
        buf = pool.acquire(9_289_728)  # a Qwen2.5-VL image embedding
        ptrs.add(buf.data_ptr())
        pool.release(buf)
    assert pool.allocations == 1 and len(ptrs) == 1
    assert pool.in_use_bytes == 0 and pool.allocated_bytes == 16 << 20


def test_concurrent_items_get_distinct_buffers() -> None:
    pool = StagingPool(64 << 20, pin=False)
    a, b = pool.acquire(1 << 20), pool.acquire(1 << 20)
    assert a.data_ptr() != b.data_ptr()
    pool.release(a)
    pool.release(b)
    assert pool.allocations == 2


def test_bounded_acquire_waits_then_times_out() -> None:
    pool = StagingPool(2 << 20, pin=False)
    held = pool.acquire(2 << 20)
    with pytest.raises(TransferTimeoutError, match="no staging memory"):
        pool.acquire(1 << 20, timeout_s=0.2)
    released = threading.Timer(0.2, pool.release, args=(held,))
    released.start()
    buf = pool.acquire(1 << 20, timeout_s=10)  # waits for the release, then reuses the room
    assert buf.numel() == 1 << 20
    released.join()
    assert pool.allocated_bytes <= pool.capacity_bytes


def test_idle_buffers_of_other_sizes_are_dropped_to_make_room() -> None:
    pool = StagingPool(4 << 20, pin=False)
    small = [pool.acquire(1 << 20) for _ in range(4)]
    for s in small:
        pool.release(s)
    big = pool.acquire(3 << 20)  # needs 4 MiB: the idle 1 MiB buffers are given up
    assert big.numel() == 4 << 20 and pool.allocated_bytes == 4 << 20


def test_item_larger_than_capacity_is_refused() -> None:
    with pytest.raises(CapacityError, match="staging capacity"):
        StagingPool(1 << 20, pin=False).acquire(3 << 20)


def test_host_round_trip_and_release() -> None:
    pool = StagingPool(8 << 20, pin=False)
    src = torch.randn(300, 200).to(torch.bfloat16).t()  # non-contiguous source
    staged = to_host_async(src, pool)
    assert torch.equal(staged.wait(), src)
    out = torch.empty(200, 300, dtype=torch.bfloat16)
    assert to_device_async(staged.tensor, out) is None  # CPU destination: copied at once
    assert torch.equal(out, src)
    staged.release()
    assert pool.in_use_bytes == 0


def test_host_view_shape() -> None:
    buf = torch.zeros(1 << 16, dtype=torch.uint8)
    v = host_view(buf, torch.Size([4, 8]), torch.float32)
    assert v.shape == (4, 8) and v.data_ptr() == buf.data_ptr()


def test_worker_side_staging_reuses_bounded_buffers_and_never_hands_them_out() -> None:
    """The CUDA load path's bookkeeping, run on host memory: fetches land in pool buffers
    (after the first, with get_into), loads copy out of them, buffers come back and are reused."""
    import threading
    from typing import Any

    from ectransfer import open_backend
    from ectransfer.connector.options import ConnectorOptions
    from ectransfer.connector.plan import ItemRef, StepPlan
    from ectransfer.connector.worker import WorkerSide

    store = open_backend("memory://")
    items = {f"k{i}": torch.full((16, 64), float(i), dtype=torch.bfloat16) for i in range(6)}
    w = WorkerSide(store, ConnectorOptions(max_staged_bytes=1 << 20), produce=False, consume=True,
                   host_staging=True, release_after_load=False)
    pool = w._pool
    assert pool is not None
    done = threading.Semaphore(0)
    events: list[dict[str, Any]] = []

    def reply(ev: dict[str, Any]) -> None:
        events.append(ev)
        done.release()

    try:
        caches = []
        for round_ in range(3):  # the same sizes again: no new buffer after the first round
            for k, t in items.items():
                store.put(k, t + 100 * round_)
            refs = [ItemRef(k, k, 16, "image") for k in items]
            for ref in refs:
                w.fetch(ref, reply, wait_s=0, announced=False)
            for _ in refs:
                done.acquire()
            assert all(ev["ev"] == "ready" for ev in events), events
            cache: dict[str, torch.Tensor] = {}
            w.load(StepPlan(refs), cache)
            caches.append(cache)
            if round_ == 0:
                first_allocations = pool.allocations
            w._reclaim_copied()
            assert pool.in_use_bytes == 0, "every staging buffer goes back once its copy ran"
        assert pool.allocations == first_allocations, "buffers are reused, not allocated per item"
        assert pool.allocated_bytes <= pool.capacity_bytes
        for round_, cache in enumerate(caches):  # each load got its own tensor, not a reused pool buffer
            for k, t in items.items():
                assert torch.equal(cache[k], t + 100 * round_), f"round {round_} {k} was overwritten"
    finally:
        w.close()
