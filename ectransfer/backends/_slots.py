"""First-fit slots in a fixed-size region (the registered arenas of the NIXL and Mooncake backends).

:class:`Allocator` hands out aligned ``[offset, offset + length)`` ranges of ``capacity`` bytes,
first fit, freed neighbours coalesce; a double free is an error. It is not thread-safe: its
owner locks it.
"""

from __future__ import annotations

import bisect
import dataclasses

__all__ = ["ALIGN", "Allocator", "Slot"]

ALIGN = 256  # keeps payloads aligned for any dtype and for device copies


@dataclasses.dataclass(frozen=True)
class Slot:
    offset: int
    length: int  # bytes asked for (the allocator reserves it rounded up to ALIGN)

    @property
    def reserved(self) -> int:
        return -(-self.length // ALIGN) * ALIGN if self.length else ALIGN


class Allocator:
    """First-fit allocation of aligned slots in ``capacity`` bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity - capacity % ALIGN
        self._free: list[tuple[int, int]] = [(0, self.capacity)] if self.capacity else []  # sorted (offset, size)
        self.used = 0

    def alloc(self, length: int) -> Slot | None:
        """A slot of ``length`` bytes, or None if no free range is large enough now."""
        slot = Slot(0, length)
        need = slot.reserved
        for i, (off, size_) in enumerate(self._free):
            if size_ >= need:
                if size_ == need:
                    del self._free[i]
                else:
                    self._free[i] = (off + need, size_ - need)
                self.used += need
                return Slot(off, length)
        return None

    def free(self, slot: Slot) -> None:
        off, size_ = slot.offset, slot.reserved
        i = bisect.bisect_left(self._free, (off, 0))
        if i < len(self._free) and self._free[i][0] < off + size_ or i > 0 and sum(self._free[i - 1]) > off:
            raise AssertionError(f"double free of slot at {off}")
        if i < len(self._free) and self._free[i][0] == off + size_:  # merge with the next range
            size_ += self._free[i][1]
            del self._free[i]
        if i > 0 and sum(self._free[i - 1]) == off:  # merge with the previous range
            off, size_ = self._free[i - 1][0], self._free[i - 1][1] + size_
            del self._free[i - 1]
            i -= 1
        self._free.insert(i, (off, size_))
        self.used -= slot.reserved

    def largest_free(self) -> int:
        return max((s for _, s in self._free), default=0)
