"""The producer: saved entries in a registered arena, served to consumers through the control
endpoint, freed on release or lease expiry.

Lifecycle of one saved entry (a wire-codec entry: header + payload, in one arena slot):

* ``put`` allocates a slot (waiting up to ``put_wait_s`` for space, then CapacityError), copies
  the entry in and publishes it as the key's new *version*; the version it replaces is retired.
* A consumer's ``lookup`` *pins* the version it returns for ``pin_s``; ``unpin`` (or the pin's
  end) lets it go. A retired version's slot is freed once nobody holds a pin on it, so a reader
  always gets one complete version, never bytes reused by another entry.
* ``free`` (the consumer released or deleted the key), ``delete``, or the lease (``lease_s``
  after the put) retires the current version.

A background thread retires expired leases and frees unpinned retired slots.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ectransfer.backends.nixl.agent import Agent
from ectransfer.backends.nixl.arena import ALIGN, Arena, Slot
from ectransfer.backends.nixl.config import BESIDE_MIN, NixlConfig
from ectransfer.backends.nixl.control import ControlServer
from ectransfer.codec import EncodedEntry, encode, header_length
from ectransfer.errors import CapacityError, ConfigError, CorruptEntryError, EntryNotFoundError

__all__ = ["Producer"]

log = logging.getLogger(__name__)

_MAX_PIN_S = 600.0


class _Item:
    __slots__ = ("expires", "head", "pin_until", "pins", "skey", "slot", "version")

    def __init__(self, skey: str, version: int, slot: Slot, head: bytes, expires: float) -> None:
        self.skey, self.version, self.slot, self.head, self.expires = skey, version, slot, head, expires
        self.pins = 0
        self.pin_until = 0.0

    def pinned(self, now: float) -> bool:
        return self.pins > 0 and self.pin_until > now


class Producer:
    """One process's saved entries and the control endpoint that serves them."""

    def __init__(self, config: NixlConfig, namespace: str, agent: Callable[[], Agent]) -> None:
        self.config = config
        self._namespace = namespace
        self._agent_factory = agent
        self._agent: Agent | None = None
        self._arena: Arena | None = None
        self._cond = threading.Condition()
        self._arena_lock = threading.Lock()
        self._live: dict[str, _Item] = {}
        self._retired: dict[tuple[str, int], _Item] = {}
        self._version = 0
        self._closed = False
        # hash_beside: large entries are hashed on a second thread while they are copied in
        self._hasher = ThreadPoolExecutor(4, thread_name_prefix="nixl-hash") if config.hashes_beside else None
        host, port = config.listen_address
        self.server = ControlServer(host, port, self.handle)
        self._reaper = threading.Thread(target=self._reap_loop, name=f"nixl-producer-{port}", daemon=True)
        self._reaper.start()

    # ----------------------------------------------------------------- arena (lazy)
    def _ensure_arena(self) -> Arena:
        # Its own lock: creating the agent takes a second, and lookups must not wait for it.
        with self._arena_lock:
            if self._arena is None:
                agent = self._agent_factory()
                arena = Arena(agent, self.config.arena_bytes, self.config.arena_device)
                with self._cond:
                    self._agent, self._arena = agent, arena
            return self._arena

    # ----------------------------------------------------------------- writes
    def put(self, skey: str, tensor: torch.Tensor) -> None:
        # The payload starts on a slot-aligned address: a READ from an address that shares no
        # alignment with the destination measured 1-21% slower (UCX cma, 9.3 MB,
        # benchmarks/nixl_datapath.py).
        entry = encode(tensor, self._namespace, align=ALIGN, defer_checksum=True)
        self._store(skey, entry, entry.nbytes, len(entry.header))

    def store_entry_bytes(self, skey: str, data: bytes) -> None:
        """Store ``data`` as the entry of ``skey`` as-is, unvalidated (fault injection in tests)."""
        try:
            head_len = min(header_length(data[:8]), len(data))
        except CorruptEntryError:
            head_len = min(len(data), 8)
        self._store(skey, data, len(data), head_len)

    def _store(self, skey: str, data: EncodedEntry | bytes, total: int, head_len: int) -> None:
        """Copy ``data`` (an entry, or raw bytes in fault tests) into a slot and publish it."""
        arena = self._ensure_arena()
        with self._cond:
            if total > arena.capacity:
                raise CapacityError(
                    f"entry {skey!r} is {total} bytes, larger than the whole nixl arena "
                    f"(arena_bytes={arena.capacity}); raise arena_bytes"
                )
            slot = self._alloc(arena, skey, total)
        try:
            beside = self._hasher if total >= BESIDE_MIN else None
            head = arena.write(slot, data, beside)[:head_len]
        except BaseException:
            with self._cond:
                self._free_slot(slot)
            raise
        with self._cond:
            self._version += 1
            item = _Item(skey, self._version, slot, head, time.monotonic() + self.config.lease_s)
            old = self._live.get(skey)
            self._live[skey] = item
            if old is not None:
                self._retire(old, time.monotonic())

    def _alloc(self, arena: Arena, skey: str, total: int) -> Slot:
        deadline = time.monotonic() + self.config.put_wait_s
        while True:
            slot = arena.allocator.alloc(total)
            if slot is not None:
                return slot
            now = time.monotonic()
            self._sweep(now)
            slot = arena.allocator.alloc(total)
            if slot is not None:
                return slot
            if now >= deadline:
                raise CapacityError(
                    f"nixl arena is full: entry {skey!r} needs {total} bytes, {arena.allocator.used} of "
                    f"{arena.capacity} bytes are held by {len(self._live)} saved and {len(self._retired)} "
                    f"pinned entries (largest free range {arena.allocator.largest_free()}); waited "
                    f"put_wait_s={self.config.put_wait_s:g} s. Entries are freed when consumers release "
                    f"them or after lease_s={self.config.lease_s:g} s; raise arena_bytes or lower lease_s"
                )
            self._cond.wait(min(deadline - now, 0.05))

    # ----------------------------------------------------------------- state changes (lock held)
    def _retire(self, item: _Item, now: float) -> None:
        if self._live.get(item.skey) is item:
            del self._live[item.skey]
        if item.pinned(now):
            self._retired[(item.skey, item.version)] = item
        else:
            self._retired.pop((item.skey, item.version), None)
            self._free_slot(item.slot)

    def _free_slot(self, slot: Slot) -> None:
        assert self._arena is not None
        self._arena.allocator.free(slot)
        self._cond.notify_all()

    def _sweep(self, now: float) -> None:
        for item in [i for i in self._live.values() if i.expires <= now]:
            self._retire(item, now)
        for item in [i for i in self._retired.values() if not i.pinned(now)]:
            del self._retired[(item.skey, item.version)]
            self._free_slot(item.slot)

    def _reap_loop(self) -> None:
        period = min(0.5, self.config.lease_s / 4)
        with self._cond:
            while not self._closed:
                if self._arena is not None:
                    self._sweep(time.monotonic())
                self._cond.wait(period)

    # ----------------------------------------------------------------- queries
    def exists(self, skeys: list[str]) -> list[bool]:
        now = time.monotonic()
        with self._cond:
            return [(i := self._live.get(k)) is not None and i.expires > now for k in skeys]

    def lookup(self, skeys: list[str], pin_s: float) -> list[dict[str, Any] | None]:
        """Locations of the current versions of ``skeys`` (None if absent), each pinned."""
        now = time.monotonic()
        pin_until = now + min(max(pin_s, 0.0), _MAX_PIN_S)
        out: list[dict[str, Any] | None] = []
        with self._cond:
            for k in skeys:
                item = self._live.get(k)
                if item is None or item.expires <= now:
                    out.append(None)
                    continue
                assert self._arena is not None
                item.pins += 1
                item.pin_until = max(item.pin_until, pin_until)
                out.append({"v": item.version, "head": item.head, "total": item.slot.length,
                            "addr": self._arena.base + item.slot.offset, "dev": self._arena.dev_id,
                            "mem": self._arena.mem_type})
        return out

    def unpin(self, pins: list[tuple[str, int]]) -> None:
        now = time.monotonic()
        with self._cond:
            for skey, version in pins:
                item = self._live.get(skey)
                if item is None or item.version != version:
                    item = self._retired.get((skey, version))
                    if item is None:
                        continue
                    item.pins = max(0, item.pins - 1)
                    if not item.pinned(now):
                        del self._retired[(skey, version)]
                        self._free_slot(item.slot)
                else:
                    item.pins = max(0, item.pins - 1)

    def free(self, skeys: list[str]) -> None:
        now = time.monotonic()
        with self._cond:
            for k in skeys:
                item = self._live.get(k)
                if item is not None:
                    self._retire(item, now)

    def clear(self) -> None:
        """Drop every saved entry (pinned bytes are freed once their readers are done)."""
        with self._cond:
            self.free(list(self._live))

    def pin_local(self, skey: str) -> tuple[_Item, Arena] | None:
        """The current version of ``skey`` pinned for a read in this process, or None."""
        with self._cond:
            got = self.lookup([skey], self.config.timeout_s)[0]
            if got is None:
                return None
            assert self._arena is not None
            return self._live[skey], self._arena

    def entry_bytes(self, skey: str) -> bytes:
        """The stored bytes of ``skey`` (diagnostics and fault tests)."""
        with self._cond:
            item = self._live.get(skey)
            if item is None or self._arena is None:
                raise EntryNotFoundError(f"no entry for key {skey!r} at this nixl producer")
            return self._arena.read(item.slot)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            arena = self._arena
            return {
                "listen": f"{self.server.address[0]}:{self.server.address[1]}",
                "agent": self._agent.name if self._agent else None,
                "arena_bytes": arena.capacity if arena else 0,
                "arena_used_bytes": arena.allocator.used if arena else 0,
                "items": len(self._live),
                "retired_items": len(self._retired),
                "pinned_items": sum(1 for i in [*self._live.values(), *self._retired.values()] if i.pins),
            }

    # ----------------------------------------------------------------- control endpoint
    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if request.get("unpin"):  # pins a consumer is done with ride on its next request
            self.unpin([(str(k), int(v)) for k, v in request["unpin"]])
        if op == "exists":
            return {"found": self.exists(_keys(request))}
        if op == "lookup":
            items = self.lookup(_keys(request), float(request.get("pin_s", self.config.timeout_s)))
            return {"agent": self._agent.name if self._agent else None, "items": items}
        if op == "metadata":
            if self._agent is None:
                raise EntryNotFoundError("this nixl producer has saved nothing yet")
            return {"agent": self._agent.name, "metadata": self._agent.metadata()}
        if op == "unpin":
            return {}
        if op == "free":
            self.free(_keys(request))
            return {}
        raise ConfigError(f"unknown nixl control op {op!r}")

    def close(self) -> None:
        self.server.close()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._reaper.join(timeout=5)
        if self._hasher is not None:
            self._hasher.shutdown(wait=True)
        with self._cond:
            self._live.clear()
            self._retired.clear()
            if self._arena is not None:
                self._arena.close()


def _keys(request: dict[str, Any]) -> list[str]:
    keys = request.get("keys")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ConfigError("control request needs 'keys': a list of strings")
    return keys
