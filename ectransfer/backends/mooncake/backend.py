"""The Mooncake Store backend: entries in a Mooncake distributed store, moved through
registered memory.

Each entry is one Mooncake object under ``key_prefix + "<namespace>/<key>"`` holding the wire
codec's bytes (header + payload), so it carries its checksum wherever Mooncake places it.

Data path (see :mod:`ectransfer.backends.mooncake.arena`): a put copies the entry once into
the registered staging buffer and Mooncake sends it from there (``upsert_from`` /
``batch_upsert_from``); a get lands it there (``get_into`` / ``batch_get_into``), the
checksum is verified in place and only then is the payload copied into the caller's tensor.
Nothing is registered per item.

Overwrites: ``put`` of an existing Mooncake key keeps the *old* value, so writes use
``upsert``. Mooncake updates a same-size value in place and preempts an older in-flight upsert
of the same key, so the backend adds what the contract needs on top:

* writers of one key in this process are serialised (striped locks); a write preempted by a
  writer in another process (``ILLEGAL_CLIENT``, ...) is retried until ``timeout_s``;
* a reader that meets a value being rewritten (``REPLICA_IS_NOT_READY``) waits for the new
  one, and a read that fails its checksum (torn by an in-place rewrite) is read again, up to
  three times; a tensor that fails its checksum is never returned.

Every Mooncake data call runs on a worker thread and is bounded by ``timeout_s``
(:mod:`ectransfer.backends.mooncake.calls`); joining the store, which holds the GIL, is bounded
by Mooncake's own deadlines sized for it (:mod:`ectransfer.backends.mooncake.client`). Every
error code becomes a typed error carrying ``code`` and ``code_name``
(:mod:`ectransfer.backends.mooncake.codes`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any, TypeVar

import numpy as np
import torch

from ectransfer.backend import Backend, Capabilities
from ectransfer.backends.mooncake import client
from ectransfer.backends.mooncake.arena import ALIGN, Slot, StagingArena
from ectransfer.backends.mooncake.calls import CallRunner
from ectransfer.backends.mooncake.codes import TRANSIENT_READ, TRANSIENT_WRITE, error_for
from ectransfer.backends.mooncake.config import HEADER_ALLOWANCE, MooncakeConfig
from ectransfer.codec import decode, encode
from ectransfer.config import BackendConfig
from ectransfer.errors import BackendUnavailableError, CorruptEntryError, TransferTimeoutError

__all__ = ["MooncakeBackend"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_STRIPES = 64
_CORRUPT_READS = 3  # a torn read heals on a re-read; real corruption fails every time
_BUFFER_TOO_SMALL = -600
_NOT_FOUND = -704


class MooncakeBackend(Backend[MooncakeConfig]):
    """Entries in Mooncake Store (``mooncake://master:port``); see the module docstring."""

    name = "mooncake"
    config_class = MooncakeConfig
    # persistent: entries live in the segment holders' memory, not in the writer (unless the
    # writer itself contributes global_segment_size); Mooncake evicts when segments fill up.
    capabilities = Capabilities(
        shared_across_hosts=True, persistent=True, ttl=False, zero_copy_device=False, peer_to_peer=False
    )
    extra = "mooncake"

    def __init__(self, config: MooncakeConfig) -> None:
        super().__init__(config)
        store_mod = client.import_store()
        self._runner = CallRunner(config.io_threads)
        self._locks = [threading.Lock() for _ in range(_STRIPES)]
        self._replicate = store_mod.ReplicateConfig()
        self._replicate.replica_num = config.replica_num
        self._client: client.SharedClient | None = None
        self._arena: StagingArena | None = None
        try:
            self._client = client.join(config)
            self._store = self._client.store
            arena = StagingArena(config.local_buffer_size)
            rc = self._call(partial(self._store.register_buffer, arena.base, arena.capacity), self._deadline(),
                            "registering the staging buffer")
            if rc != 0:
                raise error_for(rc, f"register_buffer of local_buffer_size={arena.capacity} bytes")
            self._arena = arena
        except BaseException:
            self._close()
            raise

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        try:
            client.import_store()
        except BackendUnavailableError as exc:
            return False, str(exc)
        return True, ""

    @classmethod
    def config_from_url(cls, url: str | None, options: Mapping[str, Any]) -> BackendConfig:
        return MooncakeConfig.from_url(url, options)

    # ----------------------------------------------------------------- plumbing
    def _call(self, fn: Callable[[], T], deadline: float, what: str, slot: Slot | None = None) -> T:
        """``fn()`` bounded by ``deadline``; an abandoned call frees ``slot`` when it returns."""
        arena = self._arena

        def free_late(_: object) -> None:
            if arena is not None and slot is not None:
                arena.release(slot)

        try:
            return self._runner.run(fn, deadline - time.monotonic(), what, free_late if slot is not None else None)
        except TransferTimeoutError:
            if slot is not None:
                slot.handed_off = True
            raise

    def _free(self, slot: Slot) -> None:
        if not slot.handed_off and self._arena is not None:
            self._arena.release(slot)

    def _deadline(self) -> float:
        return time.monotonic() + self.config.timeout_s

    def _staging(self) -> StagingArena:
        assert self._arena is not None  # set by __init__ before any data call
        return self._arena

    @contextlib.contextmanager
    def _write_locks(self, skeys: list[str], deadline: float) -> Iterator[None]:
        """Hold the stripes of ``skeys`` (in order, so batches never deadlock)."""
        stripes = sorted({hash(k) % _STRIPES for k in skeys})
        held: list[threading.Lock] = []
        try:
            for i in stripes:
                if not self._locks[i].acquire(timeout=max(0.0, deadline - time.monotonic())):
                    raise TransferTimeoutError(f"mooncake backend: a concurrent write of {skeys[0]!r} in this process "
                                               f"did not finish within timeout_s={self.config.timeout_s}")
                held.append(self._locks[i])
            yield
        finally:
            for lock in reversed(held):
                lock.release()

    def mooncake_key(self, key: str) -> str:
        """The Mooncake object key that ectransfer key ``key`` is stored under."""
        return self.config.key_prefix + self._skey(key)

    def _mkey(self, skey: str) -> str:
        return self.config.key_prefix + skey

    # ----------------------------------------------------------------- writes
    def _upsert(self, skey: str, ptr: int, nbytes: int, slot: Slot, deadline: float) -> None:
        mkey = self._mkey(skey)
        delay = 0.001
        while True:
            rc = self._call(partial(self._store.upsert_from, mkey, ptr, nbytes, self._replicate), deadline,
                            f"put {skey!r}", slot)
            if rc == 0:
                return
            if rc not in TRANSIENT_WRITE or time.monotonic() + delay >= deadline:
                raise error_for(rc, f"put {skey!r} ({nbytes} bytes)")
            time.sleep(delay)
            delay = min(2 * delay, 0.05)

    def _put(self, skey: str, tensor: torch.Tensor) -> None:
        entry = encode(tensor, self._namespace, defer_checksum=True)
        deadline = self._deadline()
        arena = self._staging()
        slot = arena.acquire(entry.nbytes, deadline, what=f"put {skey!r}")
        try:
            entry.copy_into(arena.view(slot))
            with self._write_locks([skey], deadline):
                self._upsert(skey, slot.ptr, entry.nbytes, slot, deadline)
        finally:
            self._free(slot)

    def _put_many(self, items: list[tuple[str, torch.Tensor]]) -> None:
        latest = dict(items)  # "like put for each, in order": the last tensor of a key wins
        entries = [(k, encode(t, self._namespace, defer_checksum=True)) for k, t in latest.items()]
        deadline = self._deadline()
        arena = self._staging()
        for chunk in _chunks(entries, lambda e: e[1].nbytes, arena.capacity):
            slot = arena.acquire(sum(e.nbytes for _, e in chunk), deadline, what=f"put of {len(chunk)} entries")
            try:
                view, offsets, off = arena.view(slot), [], 0
                for _, entry in chunk:
                    entry.copy_into(view[off:])
                    offsets.append(off)
                    off += entry.nbytes
                keys = [k for k, _ in chunk]
                ptrs = [slot.ptr + o for o in offsets]
                sizes = [e.nbytes for _, e in chunk]
                with self._write_locks(keys, deadline):
                    batch = partial(self._store.batch_upsert_from, [self._mkey(k) for k in keys], ptrs, sizes,
                                    self._replicate)
                    rcs = self._call(batch, deadline, f"put of {len(keys)} entries", slot)
                    for k, ptr, n, rc in zip(keys, ptrs, sizes, rcs):
                        if rc in TRANSIENT_WRITE:
                            self._upsert(k, ptr, n, slot, deadline)
                        elif rc != 0:
                            raise error_for(rc, f"put {k!r} ({n} bytes)")
            finally:
                self._free(slot)

    def _delete(self, skeys: list[str]) -> None:
        # force: a get grants a lease during which a plain remove is refused (OBJECT_HAS_LEASE)
        rcs = self._call(partial(self._store.batch_remove, [self._mkey(k) for k in skeys], True), self._deadline(),
                         f"delete of {len(skeys)} entries")
        for k, rc in zip(skeys, rcs):
            if rc not in (0, _NOT_FOUND):
                raise error_for(rc, f"delete {k!r}")

    # ----------------------------------------------------------------- reads
    def _exists(self, skeys: list[str]) -> list[bool]:
        rcs = self._call(partial(self._store.batch_is_exist, [self._mkey(k) for k in skeys]), self._deadline(),
                         f"exists of {len(skeys)} keys")
        found = []
        for k, rc in zip(skeys, rcs):
            if rc not in (0, 1):
                raise error_for(rc, f"exists {k!r}")
            found.append(rc == 1)
        return found

    def _guess(self, out: torch.Tensor) -> int:
        """Staging room for an entry expected to fill ``out`` (no size RPC needed)."""
        return min(out.numel() * out.element_size() + HEADER_ALLOWANCE, self._staging().capacity)

    def _read(self, skey: str, out: torch.Tensor | None, deadline: float) -> torch.Tensor:
        """One entry, verified, into ``out`` (or a new tensor); retries what may heal.

        ``size`` 0 means "ask the store for it" (``get_size``); a guess that proves too small
        (``INVALID_PARAMS``) is replaced by the real size.
        """
        arena = self._staging()
        mkey = self._mkey(skey)
        size = self._guess(out) if out is not None else 0
        too_small, corrupt, delay = 0, 0, 0.001
        while True:
            if not size:
                rc = int(self._call(partial(self._store.get_size, mkey), deadline, f"get {skey!r} (size)"))
                if rc >= 0:
                    if rc <= too_small:
                        raise error_for(_BUFFER_TOO_SMALL, f"get {skey!r} into {too_small} bytes")
                    size = max(rc, 1)
                    continue
            else:
                slot = arena.acquire(size, deadline, what=f"get {skey!r}")
                try:
                    rc = int(self._call(partial(self._store.get_into, mkey, slot.ptr, size), deadline,
                                        f"get {skey!r}", slot))
                    if rc >= 0:
                        try:
                            return decode(arena.memory(slot, 0, rc), namespace=self._namespace, out=out, key=skey)
                        except CorruptEntryError:  # torn by an in-place rewrite, or really corrupt
                            corrupt += 1
                            if corrupt >= _CORRUPT_READS:
                                raise
                finally:
                    self._free(slot)
                if rc >= 0:  # read again at once: a rewrite in progress now answers "not ready"
                    continue
                if rc == _BUFFER_TOO_SMALL:
                    too_small, size = size, 0
                    continue
            if rc < 0 and (rc not in TRANSIENT_READ or time.monotonic() + delay >= deadline):
                raise error_for(rc, f"get {skey!r}")
            time.sleep(delay)
            delay = min(2 * delay, 0.05)

    def _get(self, skey: str) -> torch.Tensor:
        return self._read(skey, None, self._deadline())

    def _get_into(self, skey: str, out: torch.Tensor) -> None:
        self._read(skey, out, self._deadline())

    def _batch_read(self, skeys: list[str], outs: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """Many entries in one ``batch_get_into`` per staging-sized chunk; stragglers one by one.

        Only entries with a destination are batched (its size is the guess); the rest, and any
        entry the batch could not serve (larger than the guess, being rewritten, torn), are
        read alone afterwards, when the chunk's slot is free again.
        """
        deadline = self._deadline()
        arena = self._staging()
        got: list[torch.Tensor | None] = [None] * len(skeys)
        batched = [i for i, o in enumerate(outs) if o is not None]
        retry = [i for i, o in enumerate(outs) if o is None]
        sizes = {i: self._guess(o) for i, o in enumerate(outs) if o is not None}
        for chunk in _chunks(batched, lambda i: sizes[i], arena.capacity):
            slot = arena.acquire(sum(sizes[i] for i in chunk), deadline, what=f"get of {len(chunk)} entries")
            try:
                offsets = np.cumsum([0] + [sizes[i] for i in chunk[:-1]]).tolist()
                batch = partial(self._store.batch_get_into, [self._mkey(skeys[i]) for i in chunk],
                                [slot.ptr + o for o in offsets], [sizes[i] for i in chunk])
                rcs = self._call(batch, deadline, f"get of {len(chunk)} entries", slot)
                for i, off, rc in zip(chunk, offsets, rcs):
                    if rc >= 0:
                        try:
                            got[i] = decode(arena.memory(slot, off, rc), namespace=self._namespace, out=outs[i],
                                            key=skeys[i])
                        except CorruptEntryError:
                            retry.append(i)
                    elif rc == _BUFFER_TOO_SMALL or rc in TRANSIENT_READ:
                        retry.append(i)
                    else:
                        raise error_for(rc, f"get {skeys[i]!r}")
            finally:
                self._free(slot)
        for i in sorted(retry):
            got[i] = self._read(skeys[i], outs[i], deadline)
        done = [t for t in got if t is not None]
        assert len(done) == len(skeys)  # every index was batched or read alone
        return done

    def _get_many(self, skeys: list[str]) -> list[torch.Tensor]:
        return self._batch_read(skeys, [None] * len(skeys))

    def _get_many_into(self, skeys: list[str], outs: list[torch.Tensor]) -> None:
        self._batch_read(skeys, list(outs))

    # ----------------------------------------------------------------- lifecycle
    def _close(self) -> None:
        shared, arena = self._client, self._arena

        def shutdown() -> None:
            if shared is None:
                return
            if arena is not None:
                shared.store.unregister_buffer(arena.base)
            client.release(shared)

        if not self._runner.shutdown(shutdown, self.config.timeout_s, "close"):
            log.warning("mooncake backend %s closed while abandoned Mooncake calls still run; it lets go of its "
                        "client when they return", self.describe())

    def describe(self) -> str:
        ns = f" namespace={self._namespace!r}" if self._namespace else ""
        return f"mooncake://{self.config.master}{ns}"


def _chunks(items: list[T], nbytes: Callable[[T], int], capacity: int) -> Iterator[list[T]]:
    """Consecutive runs of ``items`` whose sizes (rounded to slots) fit ``capacity`` together."""
    run: list[T] = []
    used = 0
    for item in items:
        n = -(-max(nbytes(item), 1) // ALIGN) * ALIGN
        if run and used + n > capacity:
            yield run
            run, used = [], 0
        run.append(item)
        used += n
    if run:
        yield run
