"""Raw baseline for the mooncake backend: Mooncake's own ``put_from`` / ``get_into``.

The same bytes as the backend moves, with nothing of ectransfer in between: no codec header,
no checksum, no worker threads, no retries. The caller's bytes are not in registered memory
(RDMA needs it), so, like any Mooncake user with memory it did not register, the client
copies them into a buffer registered once (``local_buffer_size``) and ``put_from`` sends from
there; ``get_into`` lands in that buffer and the bytes are copied out. Concurrent callers
take separate ranges of it (the backend's own slot allocator, nothing more).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ectransfer.backends.mooncake.arena import Slot, StagingArena
from ectransfer.backends.mooncake.client import import_store, local_address
from ectransfer.backends.mooncake.config import MooncakeConfig
from ectransfer.bench.raw import RawClient
from ectransfer.errors import BackendConnectionError, ECTransferError

__all__ = ["Raw"]


class Raw(RawClient):
    def __init__(self, url: str, options: dict[str, Any]) -> None:
        super().__init__(url, options)
        cfg = MooncakeConfig.from_url(url, options)
        host, _, port = cfg.master.rpartition(":")
        self._prefix = cfg.key_prefix + "raw/"
        self._store = import_store().MooncakeDistributedStore()
        rc = self._store.setup(cfg.local_hostname or local_address(host, int(port)), cfg.metadata_server,
                               cfg.global_segment_size, 0, cfg.protocol, cfg.device_name, cfg.master)
        if rc != 0:
            raise BackendConnectionError(f"raw mooncake client: setup against {cfg.master} returned {rc}")
        self._arena = StagingArena(cfg.local_buffer_size)
        rc = self._store.register_buffer(self._arena.base, self._arena.capacity)
        if rc != 0:
            raise BackendConnectionError(f"raw mooncake client: register_buffer returned {rc}")

    def _slot(self, n: int, name: str) -> Slot:
        return self._arena.acquire(n, time.monotonic() + 3600, what=f"raw {name!r}")

    def write(self, name: str, data: memoryview) -> None:
        n = len(data)
        slot = self._slot(n, name)
        try:
            np.copyto(self._arena.view(slot), np.frombuffer(data, dtype=np.uint8))
            rc = self._store.put_from(self._prefix + name, slot.ptr, n)
        finally:
            self._arena.release(slot)
        if rc != 0:
            raise ECTransferError(f"raw mooncake client: put_from {name!r} returned {rc}")

    def read_into(self, name: str, out: memoryview) -> None:
        n = len(out)
        slot = self._slot(n, name)
        try:
            got = self._store.get_into(self._prefix + name, slot.ptr, n)
            if got != n:
                raise ECTransferError(f"raw mooncake client: get_into {name!r} returned {got}, expected {n} bytes")
            np.copyto(np.frombuffer(out, dtype=np.uint8), self._arena.view(slot))
        finally:
            self._arena.release(slot)

    def delete(self, name: str) -> None:
        self._store.remove(self._prefix + name, True)

    def close(self) -> None:
        self._store.unregister_buffer(self._arena.base)
        self._store.close()
