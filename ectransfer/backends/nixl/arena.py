"""A bounded region of registered memory, carved into slots.

:class:`Arena` is one tensor (host DRAM, or device memory with ``device="cuda"``) registered
with a NIXL agent **once**, plus an allocator over it: the producer keeps saved entries in
one, the consumer's ``landing="buffer"`` mode receives into another. Its slots come from the
shared first-fit :class:`~ectransfer.backends._slots.Allocator`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch

from ectransfer.backends._slots import ALIGN, Allocator, Slot
from ectransfer.codec import EncodedEntry

if TYPE_CHECKING:
    from ectransfer.backends.nixl.agent import Agent

__all__ = ["ALIGN", "Allocator", "Arena", "Slot"]


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
        if self.device.type == "cpu":
            # Touch every page now, once: a fresh page faults on first write (9.3 MB copied into
            # never-written memory: 5.8-6.3 ms, into faulted-in memory 0.8-1.1 ms, benchmarks/
            # nixl_datapath.py). RDMA registration pins (and so faults in) the pages anyway.
            self.tensor.numpy().fill(0)
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

    def write(self, slot: Slot, data: EncodedEntry | bytes, beside: ThreadPoolExecutor | None = None) -> bytes:
        """Fill ``slot`` with ``data``: an entry (its deferred checksum computed from the copy,
        :meth:`EncodedEntry.copy_into`, hashing on ``beside`` if given) or raw bytes. Returns
        the entry's (sealed) header, or the raw bytes themselves."""
        if isinstance(data, EncodedEntry):
            if self.device.type == "cpu":
                return data.copy_into(self.tensor.numpy()[slot.offset : slot.offset + slot.length], beside)
            host = np.empty(data.nbytes, dtype=np.uint8)
            header = data.copy_into(host, beside)
        else:
            host, header = np.frombuffer(data, dtype=np.uint8), bytes(data)
        if self.device.type == "cpu":
            np.copyto(self.tensor.numpy()[slot.offset : slot.offset + len(host)], host)
        else:
            self.tensor[slot.offset : slot.offset + len(host)].copy_(torch.from_numpy(host))
            torch.cuda.synchronize(self.device)  # readers may READ as soon as the slot is published
        return header

    def read(self, slot: Slot) -> bytes:
        if self.device.type == "cpu":
            return bytes(self.host_view(slot))
        return bytes(self.view(slot).cpu().numpy())

    def close(self) -> None:
        self._agent.deregister(self._registration)
