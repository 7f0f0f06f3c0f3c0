"""Thread-safe bookkeeping of a tiered stack: per-key locks and counters."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator

__all__ = ["Counters", "KeyLocks"]


class _Slot:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class KeyLocks:
    """One lock per storage key while someone holds or waits for it (no table of every key).

    A put, a delete, a read that may promote, and the write-back of one key exclude each
    other, so a promotion never writes back a version older than a put that ran meanwhile and
    a delete never races the background copy of the key it deletes. Keys are locked in sorted
    order, so batches cannot deadlock each other.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._slots: dict[str, _Slot] = {}

    @contextlib.contextmanager
    def hold(self, skeys: Iterable[str]) -> Iterator[None]:
        keys = sorted(set(skeys))
        with self._guard:
            slots = []
            for k in keys:
                slot = self._slots.get(k)
                if slot is None:
                    slot = self._slots[k] = _Slot()
                slot.users += 1
                slots.append(slot)
        acquired: list[_Slot] = []
        try:
            for slot in slots:
                slot.lock.acquire()
                acquired.append(slot)
            yield
        finally:
            for slot in reversed(acquired):
                slot.lock.release()
            with self._guard:
                for k, slot in zip(keys, slots):
                    slot.users -= 1
                    if slot.users == 0:
                        del self._slots[k]


class Counters:
    """Named cumulative counters; every name given at construction reads 0 until counted."""

    def __init__(self, names: Iterable[str]) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = dict.fromkeys(names, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)
