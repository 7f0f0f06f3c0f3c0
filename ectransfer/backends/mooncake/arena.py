"""The registered staging buffer every item crosses, carved into slots.

One host buffer of ``local_buffer_size`` bytes is registered with Mooncake **once**, when the
backend opens (RDMA needs registered memory; TCP does not care), and every put and get moves
its bytes through a slot of it: a put copies header and payload in and Mooncake sends from
there; a get lands the entry there, the checksum is verified there, and only then is the
payload copied into the caller's tensor. So a failed, torn or abandoned transfer never writes
into memory the caller owns.

Slots are first-fit ranges, freed ranges coalesce. A caller that finds no room waits (until
its deadline) for other calls to release theirs; an item larger than the whole buffer is a
:class:`~ectransfer.errors.CapacityError` naming ``local_buffer_size`` at once.
"""

from __future__ import annotations

import bisect
import dataclasses
import threading
import time

import numpy as np

from ectransfer.errors import CapacityError, TransferTimeoutError

__all__ = ["ALIGN", "Slot", "StagingArena"]

ALIGN = 256  # slot starts stay aligned for every dtype (the payload sits 8-aligned behind the header)


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
        self._free: list[tuple[int, int]] = [(0, capacity)]  # sorted (offset, size)
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
        reserved = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        if reserved > self.capacity:
            raise CapacityError(
                f"mooncake backend: {what} needs {nbytes} bytes of staging buffer but local_buffer_size is "
                f"{self.capacity}: raise local_buffer_size above the largest item (plus 64 KiB for its header)"
            )
        with self._cond:
            while True:
                for i, (off, free) in enumerate(self._free):
                    if free >= reserved:
                        if free == reserved:
                            del self._free[i]
                        else:
                            self._free[i] = (off + reserved, free - reserved)
                        return Slot(off, nbytes, reserved, self.base + off)
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
            start, end = slot.offset, slot.offset + slot.reserved
            i = bisect.bisect(self._free, (start, 0))
            if i < len(self._free) and self._free[i][0] == end:  # merge with the next range
                end += self._free.pop(i)[1]
            if i > 0 and sum(self._free[i - 1]) == start:  # ... and with the previous one
                start = self._free[i - 1][0]
                self._free[i - 1] = (start, end - start)
            else:
                self._free.insert(i, (start, end - start))
            self._cond.notify_all()

    @property
    def free_bytes(self) -> int:
        with self._cond:
            return sum(size for _, size in self._free)
