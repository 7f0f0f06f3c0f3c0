"""TieredBackend: ordered tiers, fastest first, behind the one Backend contract.

Every tier is a backend of its own, opened through :func:`ectransfer.open_backend` with the
stack's namespace, so a tier stores a key under the same storage key the stack was given.

* **get / get_into**: the tiers are asked in order (with the write-back queue just before the
  first ``write='back'`` tier); the first valid entry is returned and copied into every faster
  tier with ``promote`` (not into tiers that failed during this read). A miss goes on down; a
  corrupt entry is counted and skipped, never returned nor promoted; a failing tier (down,
  timeout) is skipped too. If no tier has a valid entry the read raises: corruption first
  (:class:`CorruptEntryError`), else the first tier failure (its typed error, naming the tier),
  else :class:`EntryNotFoundError`.
* **put**: the tiers are written slowest first: ``through`` tiers synchronously, ``around``
  tiers lose any entry of the key, ``back`` tiers get the item from the write-back queue after
  the put returned. A tier too small for an item is skipped if a slower tier stores it; any
  other failure of a ``through`` tier fails the put (not acknowledged).
* **exists**: True as soon as any tier (or the write-back queue) has the key; a key that no tier
  could confirm and some tier could not answer for raises that tier's error.
* **delete**: every tier and the queue; **release**: forwarded to every tier.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import urlsplit

import torch

from ectransfer.backend import Backend, Capabilities
from ectransfer.backends.tiered.bookkeeping import Counters, KeyLocks
from ectransfer.backends.tiered.config import TieredConfig, TierSpec, in_tier
from ectransfer.backends.tiered.writeback import PendingItem, WriteBack
from ectransfer.config import BackendConfig
from ectransfer.errors import (
    BackendClosedError,
    CapacityError,
    ConfigError,
    CorruptEntryError,
    ECTransferError,
    EntryNotFoundError,
    IncompatibleTensorError,
    InvalidKeyError,
    TransferTimeoutError,
)

__all__ = ["TieredBackend"]

log = logging.getLogger(__name__)

#: per-tier counters, ``tier<i>_<name>`` in :meth:`TieredBackend.stats`
TIER_COUNTERS = ("hits", "misses", "corrupt", "errors", "promotions", "promotion_failures", "too_large",
                 "bytes_read", "bytes_written")
WRITE_BACK_COUNTERS = ("write_back_queued", "write_back_written", "write_back_retries", "write_back_failures",
                       "write_back_lost", "write_back_hits")
#: errors a read or write must pass on at once: the caller's mistake or a closed stack
_CALLER_ERRORS = (IncompatibleTensorError, InvalidKeyError, BackendClosedError)


def _key(skey: str) -> str:
    """The key of a storage key (the namespace part goes back on inside each tier)."""
    return skey.rpartition("/")[2]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


_VARIANTS: dict[Capabilities, type[TieredBackend]] = {}
_VARIANTS_LOCK = threading.Lock()


def _variant(caps: Capabilities) -> type[TieredBackend]:
    """The TieredBackend subclass declaring ``caps``: capabilities are class attributes that
    callers read from the class, and a stack's depend on its tiers."""
    with _VARIANTS_LOCK:
        cls = _VARIANTS.get(caps)
        if cls is None:
            cls = type("TieredBackend", (TieredBackend,), {
                "capabilities": caps, "__module__": __name__, "__qualname__": "TieredBackend",
                "__doc__": TieredBackend.__doc__})
            _VARIANTS[caps] = cls
        return cls


class TieredBackend(Backend[TieredConfig]):
    """A stack of backends, fastest first (see the module docstring and docs/backends/tiered.md).

    ``TieredBackend.capabilities`` promises nothing; an opened stack is an instance of a
    subclass whose capabilities are derived from its tiers
    (:func:`~ectransfer.backends.tiered.config.derive_capabilities`).
    """

    name = "tiered"
    config_class = TieredConfig
    capabilities: ClassVar[Capabilities] = Capabilities(
        shared_across_hosts=False, persistent=False, ttl=False, zero_copy_device=False, peer_to_peer=False
    )

    def __new__(cls, config: TieredConfig) -> TieredBackend:
        if isinstance(config, TieredConfig) and config.specs:
            cls = _variant(config.capabilities)
        return super().__new__(cls)

    def __init__(self, config: TieredConfig) -> None:
        super().__init__(config)
        self._specs: tuple[TierSpec, ...] = config.specs
        self._tiers: list[Backend[Any]] = []
        try:
            for spec in self._specs:
                self._tiers.append(spec.open())
        except BaseException:
            self._close_tiers()
            raise
        self._locks = KeyLocks()
        names = [f"tier{i}_{c}" for i in range(len(self._specs)) for c in TIER_COUNTERS]
        back = {s.index: t for s, t in zip(self._specs, self._tiers) if s.write == "back"}
        self._counts = Counters(names + (list(WRITE_BACK_COUNTERS) if back else []))
        self._write_back: WriteBack | None = None
        if back:
            self._write_back = WriteBack(back, self._locks, self._counts, config.write_back_max_bytes,
                                         {i: self._specs[i].shown() for i in back})

    @classmethod
    def config_from_url(cls, url: str | None, options: Mapping[str, Any]) -> BackendConfig:
        if url:
            parts = urlsplit(url)
            if parts.netloc or parts.path.strip("/"):
                raise ConfigError("tiered backend: a tiered:// URL names no location; write "
                                  "tiered://?tiers=<JSON list> or give the 'tiers' option")
        return TieredConfig.from_options(options)

    # ------------------------------------------------------------------ introspection
    @property
    def tiers(self) -> tuple[Backend[Any], ...]:
        """The opened tier backends, fastest first."""
        return tuple(self._tiers)

    @property
    def specs(self) -> tuple[TierSpec, ...]:
        return self._specs

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every acknowledged item is in its write-back tiers too.

        Raises :class:`TransferTimeoutError` if some are not after ``timeout_s`` (default: the
        stack's ``timeout_s``); they stay queued and keep being retried.
        """
        self._check_open()
        if self._write_back is None:
            return
        left = self._write_back.flush(self.config.timeout_s if timeout_s is None else timeout_s)
        if left:
            raise TransferTimeoutError(f"tiered backend: {left} acknowledged item(s) not yet written to the "
                                       "write-back tier(s) after the flush timeout")

    # ------------------------------------------------------------------ reads
    def _get(self, skey: str) -> torch.Tensor:
        return self._read(skey, None)

    def _get_into(self, skey: str, out: torch.Tensor) -> None:
        self._read(skey, out)

    def _read(self, skey: str, out: torch.Tensor | None) -> torch.Tensor:
        key = _key(skey)
        corrupt: list[ECTransferError] = []
        failed: list[ECTransferError] = []
        skip: set[int] = set()  # tiers that failed this read: no promotion into them
        with self._locks.hold([skey]):
            queue_checked = self._write_back is None
            for i, (spec, tier) in enumerate(zip(self._specs, self._tiers)):
                if spec.write == "back" and not queue_checked:
                    queue_checked = True
                    held = self._write_back.peek(skey) if self._write_back is not None else None
                    if held is not None:
                        got = self._from_queue(skey, held, out)
                        self._counts.add("write_back_hits")
                        self._promote(key, got, i, skip)
                        return got
                try:
                    got = tier.get(key) if out is None else tier.get_into(key, out)
                except EntryNotFoundError:
                    self._counts.add(f"tier{i}_misses")
                    continue
                except CorruptEntryError as exc:  # skipped; a valid copy below is promoted over it
                    self._counts.add(f"tier{i}_corrupt")
                    corrupt.append(in_tier(spec, exc))
                    continue
                except _CALLER_ERRORS:
                    raise
                except ECTransferError as exc:
                    self._counts.add(f"tier{i}_errors")
                    failed.append(in_tier(spec, exc))
                    skip.add(i)
                    continue
                self._counts.add(f"tier{i}_hits")
                self._counts.add(f"tier{i}_bytes_read", _nbytes(got))
                self._promote(key, got, i, skip)
                return got
        if corrupt:
            raise corrupt[0]
        if failed:
            raise failed[0]
        raise EntryNotFoundError(f"no entry for key {skey!r} in any of the {len(self._tiers)} tiers")

    @staticmethod
    def _from_queue(skey: str, held: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        if out is None:
            return held.clone()  # the queued copy must stay as it was acknowledged
        if held.dtype != out.dtype or held.shape != out.shape:
            raise IncompatibleTensorError(f"entry {skey!r} is {held.dtype}{list(held.shape)}, "
                                          f"destination is {out.dtype}{list(out.shape)}")
        out.copy_(held)
        return out

    def _promote(self, key: str, t: torch.Tensor, hit: int, skip: set[int]) -> None:
        """Copy a verified entry found in tier ``hit`` into the faster tiers (best effort)."""
        for j in range(hit):
            if not self._specs[j].promote or j in skip:
                continue
            try:
                self._tiers[j].put(key, t)
            except CapacityError:
                self._counts.add(f"tier{j}_too_large")
            except ECTransferError as exc:  # the read is served anyway; the next one tries again
                self._counts.add(f"tier{j}_promotion_failures")
                log.debug("tiered backend: promoting %r into %s failed: %s", key, self._specs[j].shown(), exc)
            else:
                self._counts.add(f"tier{j}_promotions")
                self._counts.add(f"tier{j}_bytes_written", _nbytes(t))

    def _exists(self, skeys: list[str]) -> list[bool]:
        found = [False] * len(skeys)
        todo = list(range(len(skeys)))
        unanswered: set[int] = set()  # asked a tier that failed
        failure: ECTransferError | None = None
        queue_checked = self._write_back is None
        for i, (spec, tier) in enumerate(zip(self._specs, self._tiers)):
            if not todo:
                break
            if spec.write == "back" and not queue_checked and self._write_back is not None:
                queue_checked = True
                for j, held in zip(todo, self._write_back.holds([skeys[j] for j in todo])):
                    found[j] = found[j] or held
                todo = [j for j in todo if not found[j]]
                if not todo:
                    break
            try:
                answers = tier.exists([_key(skeys[j]) for j in todo])
            except _CALLER_ERRORS:
                raise
            except ECTransferError as exc:
                self._counts.add(f"tier{i}_errors")
                failure = failure or in_tier(spec, exc)
                unanswered.update(todo)
                continue
            for j, yes in zip(todo, answers):
                found[j] = bool(yes)
            todo = [j for j in todo if not found[j]]
        if failure is not None and unanswered.intersection(todo):
            raise failure
        return found

    # ------------------------------------------------------------------ writes
    def _put(self, skey: str, tensor: torch.Tensor) -> None:
        self._write({skey: tensor})

    def _put_many(self, items: list[tuple[str, torch.Tensor]]) -> None:
        batch = dict(items)  # the last tensor of a repeated key wins, as with put in a loop
        wb_max = self.config.write_back_max_bytes
        if self._write_back is not None and sum(_nbytes(t) for t in batch.values()) > wb_max:
            for skey, t in batch.items():  # each item fits the write-back queue, the batch would not
                self._write({skey: t})
            return
        self._write(batch)

    def _write(self, items: dict[str, torch.Tensor]) -> None:
        wb = self._write_back
        reserved = sum(_nbytes(t) for t in items.values()) if wb is not None else 0
        if wb is not None:
            wb.reserve(reserved, self.config.timeout_s)  # before anything is written: all or nothing
        committed = False
        try:
            with self._locks.hold(items):
                below: set[str] = set()  # keys a slower tier stores (or will, for write-back)
                for j in reversed(range(len(self._tiers))):
                    spec, tier = self._specs[j], self._tiers[j]
                    try:
                        if spec.write == "around":
                            tier.delete([_key(k) for k in items])
                        elif spec.write == "back":
                            below.update(items)
                        else:
                            below.update(self._put_through(j, items, below))
                    except _CALLER_ERRORS:
                        raise
                    except ECTransferError as exc:
                        self._counts.add(f"tier{j}_errors")
                        raise in_tier(spec, exc) from exc
                if wb is not None:
                    back = [s.index for s in self._specs if s.write == "back"]
                    wb.commit(PendingItem(k, _key(k), t.clone(), _nbytes(t), list(back)) for k, t in items.items())
                    committed = True
        finally:
            if wb is not None and not committed:
                wb.cancel(reserved)

    def _put_through(self, j: int, items: dict[str, torch.Tensor], below: set[str]) -> list[str]:
        """Write ``items`` to tier ``j``; return the keys it stored. Too large for the tier is
        a skip (dropping the tier's older entry) when a slower tier stores the key."""
        tier = self._tiers[j]
        try:
            if len(items) == 1:
                (k, t), = items.items()
                tier.put(_key(k), t)
            else:
                tier.put_many([(_key(k), t) for k, t in items.items()])
            stored = list(items)
        except CapacityError:
            stored = []
            for k, t in items.items():
                try:
                    tier.put(_key(k), t)
                    stored.append(k)
                except CapacityError:
                    if k not in below:
                        raise
                    self._counts.add(f"tier{j}_too_large")
                    tier.delete([_key(k)])  # an older version must not be served from here
        self._counts.add(f"tier{j}_bytes_written", sum(_nbytes(items[k]) for k in stored))
        return stored

    def _delete(self, skeys: list[str]) -> None:
        first: ECTransferError | None = None
        with self._locks.hold(skeys):
            if self._write_back is not None:
                self._write_back.discard(skeys)
            for i, (spec, tier) in enumerate(zip(self._specs, self._tiers)):
                try:
                    tier.delete([_key(k) for k in skeys])
                except ECTransferError as exc:  # the other tiers still lose the entry
                    self._counts.add(f"tier{i}_errors")
                    first = first or in_tier(spec, exc)
        if first is not None:
            raise first

    def _release(self, skeys: list[str]) -> None:
        first: ECTransferError | None = None
        for i, (spec, tier) in enumerate(zip(self._specs, self._tiers)):
            try:
                tier.release([_key(k) for k in skeys])
            except ECTransferError as exc:
                self._counts.add(f"tier{i}_errors")
                first = first or in_tier(spec, exc)
        if first is not None:
            raise first

    # ------------------------------------------------------------------ lifecycle, stats
    def _close(self) -> None:
        lost = 0
        if self._write_back is not None:
            flush_s = self.config.flush_timeout_s or self.config.timeout_s
            join_s = max(float(s.options.get("timeout_s", self.config.timeout_s)) for s in self._specs) + 1.0
            lost = self._write_back.close(flush_s, join_s)
        self._close_tiers()
        if lost:
            raise TransferTimeoutError(f"tiered backend: closed with {lost} acknowledged item(s) never written to "
                                       "the write-back tier(s) (still failing after flush_timeout_s)")

    def _close_tiers(self) -> None:
        for spec, tier in zip(self._specs, self._tiers):
            try:
                tier.close()
            except Exception as exc:  # noqa: BLE001 - one tier failing to close must not keep the others open
                log.warning("tiered backend: closing %s failed: %s: %s", spec.shown(), type(exc).__name__, exc)

    def stats(self) -> dict[str, Any]:
        """Counters per tier (``tier<i>_hits``, ``_misses``, ``_corrupt``, ``_errors``,
        ``_promotions``, ``_promotion_failures``, ``_too_large``, ``_bytes_read``,
        ``_bytes_written``, and ``_evictions`` where the tier counts them), each tier's own
        ``stats()`` as ``tier<i>_<name>``, and for write-back the queue's counters and levels."""
        out: dict[str, Any] = dict(self._counts.snapshot())
        for i, tier in enumerate(self._tiers):
            evictions = getattr(tier, "evictions", None)
            if isinstance(evictions, int) and not isinstance(evictions, bool):
                out[f"tier{i}_evictions"] = evictions
            try:
                own = tier.stats()
            except Exception as exc:  # noqa: BLE001 - a tier's readings must never break the stack's
                log.debug("tiered backend: stats of %s failed: %s", self._specs[i].shown(), exc)
                continue
            for name, value in own.items():
                out.setdefault(f"tier{i}_{name}", value)
        if self._write_back is not None:
            out.update(self._write_back.levels())
        return out

    def describe(self) -> str:
        tiers = " -> ".join(f"{t.describe()} [{s.write}]" for s, t in zip(self._specs, self._tiers))
        ns = f" namespace={self._namespace!r}" if self._namespace else ""
        return f"tiered({tiers}){ns}"
