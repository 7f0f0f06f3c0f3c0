"""The registered staging buffer every item crosses, carved into slots.

One host buffer of ``local_buffer_size`` bytes is registered with Mooncake **once**, when the
backend opens (RDMA needs registered memory; TCP does not care), and every put and get moves
its bytes through a slot of it: a put copies header and payload in and Mooncake sends from
there; a get lands the entry there, the checksum is verified there, and only then is the
payload copied into the caller's tensor. So a failed, torn or abandoned transfer never writes
into memory the caller owns.

Slots are first-fit ranges of the shared :class:`~ectransfer.backends._slots.Allocator`, freed
ranges coalesce. A caller that finds no room waits (until
its deadline) for other calls to release theirs; an item larger than the whole buffer is a
:class:`~ectransfer.errors.CapacityError` naming ``local_buffer_size`` at once.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np

from ectransfer.backends import _slots
from ectransfer.backends._slots import ALIGN
from ectransfer.errors import CapacityError, TransferTimeoutError

__all__ = ["ALIGN", "Slot", "StagingArena"]


@dataclasses.dataclass(eq=False)
class Slot:
    """``length`` bytes at ``offset`` of the arena (``ptr`` is the address Mooncake is given)."""

    offset: int
    length: int
    reserved: int
    ptr: int
    #: set when an abandoned Mooncake call still uses the slot: that call frees it
    handed_off: bool = False


class StagingArena:
    """A registered buffer of ``capacity`` bytes handing out :class:`Slot` ranges (thread-safe)."""

    def __init__(self, capacity: int) -> None:
        # Written once so every page is resident before registration: np.zeros would map
        # untouched pages and the first transfers would pay the page faults.
        self.buffer = np.empty(capacity, dtype=np.uint8)
        self.buffer.fill(0)
        self.capacity = capacity
        self.base: int = self.buffer.ctypes.data
        self._alloc = _slots.Allocator(capacity)
        self._cond = threading.Condition()

    def view(self, slot: Slot) -> np.ndarray:
        """The slot's bytes (a view of the arena, no copy)."""
        return self.buffer[slot.offset : slot.offset + slot.length]

    def memory(self, slot: Slot, start: int = 0, length: int | None = None) -> memoryview:
        """``length`` bytes of the slot from ``start`` as a memoryview (no copy)."""
        end = slot.offset + start + (slot.length - start if length is None else length)
        return memoryview(self.buffer[slot.offset + start : end])  # type: ignore[arg-type]

    def acquire(self, nbytes: int, deadline: float, *, what: str) -> Slot:
        """A slot of ``nbytes``; waits for room until ``deadline`` (``time.monotonic()``)."""
        reserved = _slots.Slot(0, nbytes).reserved
        if reserved > self._alloc.capacity:
            raise CapacityError(
                f"mooncake backend: {what} needs {nbytes} bytes of staging buffer but local_buffer_size is "
                f"{self.capacity}: raise local_buffer_size above the largest item (plus 64 KiB for its header)"
            )
        with self._cond:
            while True:
                got = self._alloc.alloc(nbytes)
                if got is not None:
                    return Slot(got.offset, nbytes, got.reserved, self.base + got.offset)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransferTimeoutError(
                        f"mooncake backend: {what}: no room in the staging buffer (local_buffer_size="
                        f"{self.capacity}) before the timeout; other transfers hold it"
                    )
                self._cond.wait(left)

    def release(self, slot: Slot) -> None:
        """Give ``slot`` back (its neighbours coalesce); wakes callers waiting for room."""
        with self._cond:
            self._alloc.free(_slots.Slot(slot.offset, slot.length))
            self._cond.notify_all()

    @property
    def free_bytes(self) -> int:
        with self._cond:
            return self._alloc.capacity - self._alloc.used
