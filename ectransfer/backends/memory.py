"""In-process backend: thread-safe, optionally bounded (LRU), for tests and tiering.

``memory://`` opens a private store; ``memory://NAME`` opens the store called NAME, shared by
every backend opened with that name in this process. Entries are kept encoded (the wire
codec), so they are checksummed like any other backend's, and ``get`` returns a copy the
caller may mutate freely.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import urlsplit

import torch

from ectransfer.backend import Backend, Capabilities
from ectransfer.codec import decode, encode
from ectransfer.config import BackendConfig, size
from ectransfer.errors import CapacityError, ConfigError, EntryNotFoundError

__all__ = ["MemoryBackend", "MemoryConfig"]


@dataclasses.dataclass(frozen=True)
class MemoryConfig(BackendConfig):
    """``store``: name of a process-wide shared store ("" = private); ``max_bytes``: LRU bound."""

    backend_name: ClassVar[str] = "memory"
    store: str = ""
    max_bytes: int | None = size(None)


class _Store:
    def __init__(self, max_bytes: int | None) -> None:
        self.lock = threading.Lock()
        self.entries: OrderedDict[str, bytes] = OrderedDict()
        self.nbytes = 0
        self.max_bytes = max_bytes
        self.evictions = 0


_SHARED: dict[str, _Store] = {}
_SHARED_LOCK = threading.Lock()


class MemoryBackend(Backend[MemoryConfig]):
    name = "memory"
    config_class = MemoryConfig
    capabilities = Capabilities(
        shared_across_hosts=False, persistent=False, ttl=False, zero_copy_device=False, peer_to_peer=False
    )

    def __init__(self, config: MemoryConfig) -> None:
        super().__init__(config)
        if config.store:
            with _SHARED_LOCK:
                store = _SHARED.get(config.store)
                if store is None:
                    store = _SHARED[config.store] = _Store(config.max_bytes)
                elif config.max_bytes is not None and store.max_bytes != config.max_bytes:
                    raise ConfigError(
                        f"memory store {config.store!r} is already open with max_bytes={store.max_bytes}"
                    )
        else:
            store = _Store(config.max_bytes)
        self._store = store

    @classmethod
    def config_from_url(cls, url: str | None, options: Mapping[str, Any]) -> BackendConfig:
        fixed = {}
        if url:
            parts = urlsplit(url)
            name = (parts.netloc + parts.path).strip("/")
            if name:
                fixed["store"] = name
        return MemoryConfig.from_options(options, **fixed)

    @property
    def nbytes(self) -> int:
        """Bytes held by the store (encoded entries)."""
        return self._store.nbytes

    @property
    def evictions(self) -> int:
        return self._store.evictions

    def _put(self, skey: str, tensor: torch.Tensor) -> None:
        entry = encode(tensor, self._namespace)
        blob = entry.to_bytes()
        st = self._store
        if st.max_bytes is not None and len(blob) > st.max_bytes:
            raise CapacityError(f"entry {skey!r} ({len(blob)} bytes) exceeds max_bytes={st.max_bytes}")
        with st.lock:
            old = st.entries.pop(skey, None)
            if old is not None:
                st.nbytes -= len(old)
            st.entries[skey] = blob
            st.nbytes += len(blob)
            while st.max_bytes is not None and st.nbytes > st.max_bytes:
                _, victim = st.entries.popitem(last=False)
                st.nbytes -= len(victim)
                st.evictions += 1

    def _lookup(self, skey: str) -> bytes:
        st = self._store
        with st.lock:
            blob = st.entries.get(skey)
            if blob is None:
                raise EntryNotFoundError(f"no entry for key {skey!r} in memory store")
            st.entries.move_to_end(skey)
            return blob

    def _get(self, skey: str) -> torch.Tensor:
        return decode(self._lookup(skey), namespace=self._namespace, key=skey)

    def _get_into(self, skey: str, out: torch.Tensor) -> None:
        decode(self._lookup(skey), namespace=self._namespace, out=out, key=skey)

    def _exists(self, skeys: list[str]) -> list[bool]:
        with self._store.lock:
            return [k in self._store.entries for k in skeys]

    def _delete(self, skeys: list[str]) -> None:
        st = self._store
        with st.lock:
            for k in skeys:
                blob = st.entries.pop(k, None)
                if blob is not None:
                    st.nbytes -= len(blob)

    def _close(self) -> None:
        if not self.config.store:  # a private store dies with its backend
            with self._store.lock:
                self._store.entries.clear()
                self._store.nbytes = 0

    def describe(self) -> str:
        where = f"memory://{self.config.store}" if self.config.store else "memory:// (private)"
        return where + (f" namespace={self._namespace!r}" if self._namespace else "")
