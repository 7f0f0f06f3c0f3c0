"""A bounded region of registered memory, carved into slots.

:class:`Allocator` hands out aligned ``[offset, offset + length)`` ranges of a fixed capacity
(first fit, neighbours coalesce on free); it is not thread-safe, its owner locks it.
:class:`Arena` is one tensor (host DRAM, or device memory with ``device="cuda"``) registered
with a NIXL agent **once**, plus an allocator over it: the producer keeps saved entries in
one, the consumer's ``landing="buffer"`` mode receives into another.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from ectransfer.backends.nixl.agent import Agent

__all__ = ["ALIGN", "Allocator", "Arena", "Slot"]

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


class Arena:
    """``capacity`` bytes on ``device``, registered with ``agent`` once, plus an allocator."""

    def __init__(self, agent: Agent, capacity: int, device: str = "cpu") -> None:
        if device != "cpu":
            # Untested on this project's CPU machines: the GPU issue runs it. Fail clearly
            # rather than half-work when CUDA is absent.
            if not torch.cuda.is_available():
                from ectransfer.errors import ConfigError

                raise ConfigError(f"nixl backend: arena_device={device!r} but CUDA is not available here")
        self.device = torch.device(device)
        self.tensor = torch.empty(capacity, dtype=torch.uint8, device=self.device)
        self.mem_type = "DRAM" if self.device.type == "cpu" else "VRAM"
        self.dev_id = 0 if self.device.type == "cpu" else int(self.device.index or 0)
        self.base = int(self.tensor.data_ptr())
        self.allocator = Allocator(capacity)
        self._agent = agent
        self._registration = agent.register([(self.base, capacity, self.dev_id)], self.mem_type)

    @property
    def capacity(self) -> int:
        return self.allocator.capacity

    def view(self, slot: Slot) -> torch.Tensor:
        return self.tensor[slot.offset : slot.offset + slot.length]

    def host_view(self, slot: Slot) -> memoryview:
        """A byte view of a slot (host arenas only)."""
        arr = self.tensor.numpy()[slot.offset : slot.offset + slot.length]
        return memoryview(arr).cast("B")  # type: ignore[arg-type]

    def write(self, slot: Slot, parts: list[bytes | memoryview]) -> None:
        """Fill ``slot`` with ``parts`` back to back (one copy of each)."""
        pos = slot.offset
        for part in parts:
            n = len(part)
            if not n:
                continue
            src = np.frombuffer(part, dtype=np.uint8)
            if self.device.type == "cpu":
                np.copyto(self.tensor.numpy()[pos : pos + n], src)
            else:
                self.tensor[pos : pos + n].copy_(torch.from_numpy(src.copy()))
            pos += n
        if self.device.type != "cpu":
            torch.cuda.synchronize(self.device)  # readers may READ as soon as the slot is published

    def read(self, slot: Slot) -> bytes:
        if self.device.type == "cpu":
            return bytes(self.host_view(slot))
        return bytes(self.view(slot).cpu().numpy())

    def close(self) -> None:
        self._agent.deregister(self._registration)
