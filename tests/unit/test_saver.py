"""AsyncSaver: background saves, back-pressure, failure reporting (memory backend)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from ectransfer import CapacityError, TransferTimeoutError, open_backend
from ectransfer.backends.memory import MemoryBackend
from ectransfer.connector.saver import AsyncSaver


class _GatedBackend(MemoryBackend):
    """A memory backend whose puts wait for a gate: lets the test hold saves in flight."""

    gate: threading.Event

    def _put(self, skey: str, tensor: torch.Tensor) -> None:
        assert self.gate.wait(30)
        super()._put(skey, tensor)


def _gated() -> Any:
    be = _GatedBackend(open_backend("memory://").config)
    be.gate = threading.Event()
    return be


def test_saves_complete_in_background() -> None:
    be = open_backend("memory://")
    saver = AsyncSaver(be)
    futs = [saver.submit(f"k{i}", torch.full((10,), i)) for i in range(5)]
    for f in futs:
        f.result(timeout=10)
    saver.close()
    assert all(be.exists([f"k{i}" for i in range(5)]))
    assert torch.equal(be.get("k3"), torch.full((10,), 3))


def test_submit_does_not_wait_for_the_write() -> None:
    be = _gated()
    saver = AsyncSaver(be, max_inflight_bytes=1 << 20)
    fut = saver.submit("k", torch.zeros(100))  # returns although the put is blocked
    assert not fut.done() and saver.inflight_bytes == 400
    be.gate.set()
    fut.result(timeout=10)
    saver.flush(5)
    assert saver.inflight_bytes == 0
    saver.close()


def test_back_pressure_then_timeout() -> None:
    be = _gated()
    saver = AsyncSaver(be, max_inflight_bytes=1000, timeout_s=0.3)
    saver.submit("a", torch.zeros(200))  # 800 bytes in flight
    with pytest.raises(TransferTimeoutError, match="no room"):
        saver.submit("b", torch.zeros(100))  # 400 more would exceed 1000
    with pytest.raises(CapacityError):
        saver.submit("c", torch.zeros(1000))  # can never fit
    be.gate.set()
    saver.flush(5)
    saver.submit("b", torch.zeros(100)).result(timeout=5)
    saver.close()


def test_failed_save_surfaces_in_future() -> None:
    be = open_backend("memory://", max_bytes=100)
    saver = AsyncSaver(be)
    fut = saver.submit("too-big", torch.zeros(1000))
    with pytest.raises(CapacityError):
        fut.result(timeout=10)
    assert saver.inflight_bytes == 0
    saver.close()
