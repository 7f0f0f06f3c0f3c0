"""Write-back: acknowledged items copied down to the ``write='back'`` tiers by one thread.

An item is *acknowledged* when ``put`` returns. From then on this queue holds a private copy
of it (not a reference into the fastest tier, whose LRU may evict it at any time) until every
write-back tier has stored it, a later put of the same key supersedes it, or a delete drops
it. While it waits, reads of the key are answered from this copy (it is the newest version).

The writer retries a *transient* failure (connection lost, timeout, I/O error) with backoff
(50 ms doubling to 2 s) for as long as the stack is open; a tier that refuses an item for
good (too large, incompatible) counts ``write_back_failures``, is logged and is not asked
again for that item. ``close`` waits up to its bound for the queue to drain; items still
unwritten then are counted (``write_back_lost``), logged, and reported by ``close`` raising.
A process that dies without ``close`` loses what was still queued: the acknowledgement
promises what the ``write='through'`` tiers promise, plus a best effort below.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch

from ectransfer.backend import Backend
from ectransfer.backends.tiered.bookkeeping import Counters, KeyLocks
from ectransfer.errors import (
    BackendConnectionError,
    CapacityError,
    ECTransferError,
    StorageIOError,
    TransferTimeoutError,
)

__all__ = ["TRANSIENT", "PendingItem", "WriteBack"]

log = logging.getLogger(__name__)

#: failures worth retrying: the tier may come back
TRANSIENT = (BackendConnectionError, TransferTimeoutError, StorageIOError)
_BACKOFF_MIN_S, _BACKOFF_MAX_S = 0.05, 2.0


@dataclasses.dataclass(eq=False)
class PendingItem:
    """One acknowledged item on its way down; ``tiers`` still to write (writer thread only)."""

    skey: str
    key: str
    tensor: torch.Tensor
    nbytes: int
    tiers: list[int]
    cancelled: bool = False  # superseded by a newer put, or deleted


class WriteBack:
    """The queue of acknowledged items and its writer thread (see the module docstring)."""

    def __init__(self, tiers: dict[int, Backend[Any]], locks: KeyLocks, counters: Counters, max_bytes: int,
                 describe: dict[int, str]) -> None:
        self._tiers = tiers
        self._locks = locks
        self._counts = counters
        self._max_bytes = max_bytes
        self._describe = describe
        self._cond = threading.Condition()
        self._queue: OrderedDict[str, PendingItem] = OrderedDict()
        self._current: PendingItem | None = None
        self._bytes = 0  # reserved + queued + being written
        self._stopping = False
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="ectransfer-tiered-write-back", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ producer side
    def reserve(self, nbytes: int, timeout_s: float) -> None:
        """Make room for ``nbytes`` before a put writes anything; bounded by ``timeout_s``."""
        if nbytes > self._max_bytes:
            raise CapacityError(f"tiered backend: {nbytes} bytes exceed write_back_max_bytes={self._max_bytes}")
        with self._cond:
            if not self._cond.wait_for(lambda: self._bytes + nbytes <= self._max_bytes, timeout_s):
                raise TransferTimeoutError(
                    f"tiered backend: the write-back queue stayed full ({self._bytes} of write_back_max_bytes="
                    f"{self._max_bytes} bytes waiting for the tiers below) for {timeout_s} s")
            self._bytes += nbytes

    def cancel(self, nbytes: int) -> None:
        """Give back a reservation whose put failed (nothing was acknowledged)."""
        with self._cond:
            self._bytes -= nbytes
            self._cond.notify_all()

    def commit(self, items: Iterable[PendingItem]) -> None:
        """Queue reserved items (the caller holds their key locks); a newer item supersedes."""
        with self._cond:
            for item in items:
                self._drop(item.skey)
                self._queue[item.skey] = item
                self._counts.add("write_back_queued")
            self._cond.notify_all()

    def discard(self, skeys: Iterable[str]) -> None:
        """Forget queued items of deleted keys (the caller holds their key locks)."""
        with self._cond:
            for skey in skeys:
                self._drop(skey)
            self._cond.notify_all()

    def _drop(self, skey: str) -> None:
        old = self._queue.pop(skey, None)
        if old is not None:
            self._bytes -= old.nbytes
        if self._current is not None and self._current.skey == skey:
            self._current.cancelled = True  # its bytes are given back when the writer lets go of it

    def peek(self, skey: str) -> torch.Tensor | None:
        """The newest acknowledged, not yet written version of ``skey`` (caller holds its lock)."""
        with self._cond:
            item = self._queue.get(skey)
            if item is None and self._current is not None and self._current.skey == skey \
                    and not self._current.cancelled:
                item = self._current
            return None if item is None else item.tensor

    def holds(self, skeys: list[str]) -> list[bool]:
        with self._cond:
            current = self._current.skey if self._current is not None and not self._current.cancelled else None
            return [k in self._queue or k == current for k in skeys]

    def levels(self) -> dict[str, int]:
        with self._cond:
            items = len(self._queue) + (self._current is not None)
            return {"write_back_pending": items, "write_back_pending_bytes": self._bytes}

    # ------------------------------------------------------------------ draining
    def flush(self, timeout_s: float) -> int:
        """Wait until everything acknowledged is written below; return how many items are not."""
        with self._cond:
            self._cond.wait_for(lambda: not self._queue and self._current is None, timeout_s)
            return len(self._queue) + (self._current is not None)

    def close(self, timeout_s: float, join_s: float) -> int:
        """Drain (up to ``timeout_s``), stop the writer; return how many items were never written."""
        self.flush(timeout_s)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(join_s)  # a tier call in progress ends within its own timeout_s
        with self._cond:
            lost = len(self._queue) + (self._current is not None and not self._current.cancelled)
        if lost:
            self._counts.add("write_back_lost", lost)
            log.error("tiered backend closed with %d acknowledged item(s) not written to the write-back tier(s) "
                      "%s: they are lost", lost, ", ".join(self._describe.values()))
        return lost

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        backoff = 0.0
        while True:
            with self._cond:
                if backoff:  # a tier is failing: do not spin on it, but wake up for close
                    self._cond.wait_for(lambda: self._stopping, backoff)
                self._cond.wait_for(lambda: bool(self._queue) or self._stopping)
                if self._stopping:
                    return
                _, item = self._queue.popitem(last=False)
                self._current = item
            retry = self._write(item)
            with self._cond:
                self._current = None
                if retry and not item.cancelled and item.skey not in self._queue:
                    self._queue[item.skey] = item  # after the others: they may go to a healthy tier
                else:
                    self._bytes -= item.nbytes
                self._cond.notify_all()
            backoff = min(max(backoff * 2, _BACKOFF_MIN_S), _BACKOFF_MAX_S) if retry else 0.0

    def _write(self, item: PendingItem) -> bool:
        """Write ``item`` to the tiers it still needs; True if a transient failure calls for a retry."""
        retry = False
        with self._locks.hold([item.skey]):
            if item.cancelled:
                return False
            for index in list(item.tiers):
                try:
                    self._tiers[index].put(item.key, item.tensor)
                except TRANSIENT as exc:
                    retry = True
                    self._counts.add("write_back_retries")
                    if not self._failing:
                        log.warning("tiered backend: write-back to %s failed (%s); retrying until it works or "
                                    "the backend is closed", self._describe[index], exc)
                    self._failing = True
                    continue
                except ECTransferError as exc:
                    self._counts.add("write_back_failures")
                    log.error("tiered backend: %s refused key %r for good (%s: %s); it stays in the tiers above",
                              self._describe[index], item.key, type(exc).__name__, exc)
                else:
                    self._counts.add("write_back_written")
                    self._counts.add(f"tier{index}_bytes_written", item.nbytes)
                    if self._failing:
                        log.warning("tiered backend: write-back to %s works again", self._describe[index])
                    self._failing = False
                item.tiers.remove(index)
        return retry
