"""The Redis backend's data path: whole entries, chunked entries, versions and their clean-up.

Write (``_put``): an entry of at most ``chunk_bytes`` is one ``MULTI; GETRANGE key 0 63; SET key
entry; EXEC``. A larger entry first writes its payload chunks under keys unique to a fresh
version, each with a provisional expiry (so a writer that dies mid-way leaks nothing), then
swaps in the manifest in one transaction that also gives the chunks their final expiry (none,
or ``ttl_s`` plus ``timeout_s`` so chunks outlive the manifest, never the reverse). Whatever
the swap displaced is read from the head it returned: a displaced manifest's chunks are left
to expire ``timeout_s`` later, so readers already holding that manifest finish their read.

Read (``_get``/``_get_into``): GET the entry key; a whole entry is validated by the codec; a
manifest names its chunks, which are fetched (one GET each) straight into the destination and
the checksum is verified over the assembled payload. A chunk that is gone means the item was
replaced or deleted meanwhile (the head changed: start again, at most ``_READ_ATTEMPTS`` times)
or lost a chunk to eviction or a manual delete (same head: what is left of that version is
removed and the item reads as absent, :class:`EntryNotFoundError`). A reader never assembles
two versions: chunk keys are never reused. Bytes that fail the checksum raise
:class:`CorruptEntryError` and are never returned.

Batches (``_put_many``, ``_get_many``) pipeline entries up to 64 KiB, where pipelines measured
faster; larger ones go one command each, where pipelines did not help.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from ectransfer.backend import Backend, Capabilities
from ectransfer.backends.redis.config import RedisConfig
from ectransfer.backends.redis.layout import HEAD_LEN, Keys, Manifest, version_of
from ectransfer.codec import (
    EncodedEntry,
    EntryHeader,
    check_destination,
    decode,
    encode,
    parse_header,
    payload_view,
    verify_payload,
)
from ectransfer.config import BackendConfig
from ectransfer.errors import CapacityError, CorruptEntryError, EntryNotFoundError, TransferTimeoutError

__all__ = ["RedisBackend"]

_READ_ATTEMPTS = 4
_PROVISIONAL_SLACK_S = 60.0
# Batches go through pipelines only where that measured faster (docs/backends/redis.md):
# whole entries up to 64 KiB (manifests included, for reads).
_PIPELINE_PUT_MAX = 64 << 10
_PIPELINE_GET_MAX = 64 << 10
_PIPELINE_BYTES = 16 << 20  # bytes carried by one pipeline, to bound what is buffered


class _Replaced(Exception):
    """The manifest changed while its chunks were read: read the item again."""


class RedisBackend(Backend[RedisConfig]):
    """Redis / Valkey, standalone or Cluster. See the module docstring and docs/backends/redis.md."""

    name = "redis"
    config_class = RedisConfig
    extra = "redis"
    capabilities = Capabilities(
        shared_across_hosts=True, persistent=True, ttl=True, zero_copy_device=False, peer_to_peer=False
    )

    def __init__(self, config: RedisConfig) -> None:
        super().__init__(config)
        from ectransfer.backends.redis.client import RedisClient

        self._keys = Keys(config.key_prefix)
        self._ttl_ms = None if config.ttl_s is None else max(1, round(config.ttl_s * 1000))
        self._grace_ms = max(1, round(config.timeout_s * 1000))
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self._client = RedisClient(config)
        try:
            self._client.ping()  # wrong host, password, db or TLS settings fail here, not later
        except BaseException:
            self._client.close()
            raise

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        try:
            import redis  # noqa: F401
        except ImportError as exc:
            return False, f"redis-py is not installed ({exc})"
        return True, ""

    @classmethod
    def config_from_url(cls, url: str | None, options: Mapping[str, Any]) -> BackendConfig:
        return RedisConfig.from_url(url, options)

    def stats(self) -> dict[str, Any]:
        """``chunked_puts``; ``read_retries`` (an item replaced while being read);
        ``incomplete_removed`` (items found without a chunk, e.g. evicted: maxmemory too small)."""
        with self._counts_lock:
            return {k: self._counts[k] for k in ("chunked_puts", "read_retries", "incomplete_removed")}

    def _count(self, what: str) -> None:
        with self._counts_lock:
            self._counts[what] += 1

    @property
    def client(self) -> Any:
        """The underlying redis-py client (tests, tools)."""
        return self._client.raw

    @property
    def key_layout(self) -> Keys:
        """How storage keys map to Redis keys (tests, tools)."""
        return self._keys

    def entry_key(self, skey: str) -> str:
        """The Redis key of the entry (whole value or manifest) for storage key ``skey``."""
        return self._keys.entry(skey)

    # ------------------------------------------------------------------ write
    def _put(self, skey: str, tensor: torch.Tensor) -> None:
        self._put_entry(skey, encode(tensor, self._namespace))

    def _put_entry(self, skey: str, entry: EncodedEntry) -> None:
        key = self._keys.entry(skey)
        if entry.nbytes <= self.config.chunk_bytes:
            # One joined value: Redis takes one buffer per argument, and the join is cheaper
            # than a second command (measured in docs/backends/redis.md).
            old, _ = self._client.swap(key, entry.to_bytes(), HEAD_LEN, self._ttl_ms)
            self._retire(skey, old, None)
            return
        payload = entry.payload
        manifest = Manifest.plan(uuid.uuid4().bytes, entry.header, len(payload), self.config.chunk_bytes)
        chunk_keys = self._keys.chunks(skey, manifest.version, manifest.chunks)
        provisional_ms = round(((manifest.chunks + 2) * self.config.timeout_s + _PROVISIONAL_SLACK_S) * 1000)
        started = time.monotonic()
        for ckey, (start, end) in zip(chunk_keys, manifest.spans()):
            self._client.set_chunk(ckey, payload[start:end], provisional_ms)
        final_ms = None if self._ttl_ms is None else self._ttl_ms + self._grace_ms
        old, alive = self._client.swap(key, manifest.encode(), HEAD_LEN, self._ttl_ms, chunk_keys, final_ms)
        self._retire(skey, old, manifest.version)
        self._count("chunked_puts")
        if not all(alive):
            # A chunk vanished before the manifest went in: withdraw the manifest unless replaced.
            self._client.unlink_if_head(key, manifest.head())
            if (time.monotonic() - started) * 1000 < provisional_ms:
                # Too soon for the provisional expiry: the server evicted it (maxmemory policy).
                raise CapacityError(
                    f"redis backend: {sum(not a for a in alive)} of {manifest.chunks} chunks of {skey!r} were "
                    f"evicted by the server before the item was complete; it is not stored (raise the "
                    f"server's maxmemory or use a noeviction policy)")
            raise TransferTimeoutError(f"redis backend: writing {skey!r} took so long that its first chunks "
                                       f"expired ({manifest.chunks} chunks, timeout_s={self.config.timeout_s})")

    def _put_many(self, items: list[tuple[str, torch.Tensor]]) -> None:
        small: list[tuple[str, bytes]] = []
        budget = 0
        for skey, tensor in items:
            entry = encode(tensor, self._namespace)
            if entry.nbytes > min(_PIPELINE_PUT_MAX, self.config.chunk_bytes):
                if small:  # keep the caller's order: a repeated key ends with its last value
                    self._put_pipelined(small)
                    small, budget = [], 0
                self._put_entry(skey, entry)
                continue
            small.append((skey, entry.to_bytes()))
            budget += entry.nbytes
            if budget >= _PIPELINE_BYTES:
                self._put_pipelined(small)
                small, budget = [], 0
        if small:
            self._put_pipelined(small)

    def _put_pipelined(self, entries: list[tuple[str, bytes]]) -> None:
        olds = self._client.set_each([(self._keys.entry(k), v) for k, v in entries], self._ttl_ms)
        for (skey, _), old in zip(entries, olds):
            self._retire(skey, old[:HEAD_LEN] if old else b"", None)

    def _retire(self, skey: str, old_head: bytes, mine: bytes | None) -> None:
        """Let the chunks of a displaced manifest expire once in-flight readers are done."""
        version = version_of(old_head)
        if version is None or version == mine:  # a whole entry, nothing, or (defensively) our own
            return
        count = Manifest.chunk_count(old_head)
        if count:
            self._client.pexpire(self._keys.chunks(skey, version, count), self._grace_ms)

    # ------------------------------------------------------------------ read
    def _get(self, skey: str) -> torch.Tensor:
        return self._read(skey, None)

    def _get_into(self, skey: str, out: torch.Tensor) -> None:
        self._read(skey, out)

    def _read(self, skey: str, out: torch.Tensor | None, value: bytes | None = None,
              fetched: bool = False) -> torch.Tensor:
        """Read ``skey``; ``value`` is the entry key's value if the caller already fetched it."""
        key = self._keys.entry(skey)
        for _ in range(_READ_ATTEMPTS):
            if not fetched:
                value = self._client.get(key)
            fetched = False
            if value is None:
                raise EntryNotFoundError(f"no entry for key {skey!r} at {self.config.location()}")
            if version_of(value) is None:
                return self._whole(skey, value, out)
            try:
                return self._chunked(skey, key, value, out)
            except _Replaced:
                self._count("read_retries")
                continue
        raise TransferTimeoutError(f"redis backend: {skey!r} was replaced {_READ_ATTEMPTS} times while being "
                                   "read; no consistent version could be read")

    def _get_many(self, skeys: list[str]) -> list[torch.Tensor]:
        return self._read_many(skeys, [None] * len(skeys))

    def _get_many_into(self, skeys: list[str], outs: list[torch.Tensor]) -> None:
        self._read_many(skeys, list(outs))

    def _read_many(self, skeys: list[str], outs: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """Small entries (and manifests) in pipelined GETs, the others one GET at a time."""
        sizes = self._client.strlen_each([self._keys.entry(k) for k in skeys])
        prefetched: dict[int, bytes | None] = {}
        batch: list[int] = []
        budget = 0
        for i, n in enumerate(sizes):
            if 0 < n <= _PIPELINE_GET_MAX:
                batch.append(i)
                budget += n
            if batch and (budget >= _PIPELINE_BYTES or i == len(sizes) - 1):
                values = self._client.get_each([self._keys.entry(skeys[j]) for j in batch])
                prefetched.update(zip(batch, values))
                batch, budget = [], 0
        return [self._read(skey, out, prefetched.get(i), fetched=i in prefetched)
                for i, (skey, out) in enumerate(zip(skeys, outs))]

    def _whole(self, skey: str, value: bytes, out: torch.Tensor | None) -> torch.Tensor:
        # Every entry this backend writes is checksummed: one without metadata is not ours.
        if parse_header(value, key=skey).checksum is None:
            raise CorruptEntryError(f"entry {skey!r} carries no ectransfer checksum")
        return decode(value, namespace=self._namespace, out=out, key=skey)

    def _chunked(self, skey: str, key: str, value: bytes, out: torch.Tensor | None) -> torch.Tensor:
        manifest, header = Manifest.decode(value, key=skey)
        if header.checksum is None:
            raise CorruptEntryError(f"entry {skey!r} carries no ectransfer checksum")
        if out is not None and (out.dtype != header.dtype or tuple(out.shape) != header.shape):
            # A header that lies about dtype/shape is corruption, not a caller error: verify
            # the entry as stored before blaming the destination.
            self._assemble(skey, key, manifest, header, torch.empty(header.shape, dtype=header.dtype))
            check_destination(header, out, key=skey)
        dest = torch.empty(header.shape, dtype=header.dtype) if out is None else out
        self._assemble(skey, key, manifest, header, dest)
        return dest

    def _assemble(self, skey: str, key: str, manifest: Manifest, header: EntryHeader, dest: torch.Tensor) -> None:
        view = payload_view(dest) if header.nbytes else memoryview(b"")
        for i, (ckey, (start, end)) in enumerate(zip(self._keys.chunks(skey, manifest.version, manifest.chunks),
                                                      manifest.spans())):
            chunk = self._client.get(ckey)
            if chunk is None:
                now = self._client.head(key, HEAD_LEN)
                if not now:
                    raise EntryNotFoundError(f"entry {skey!r} was deleted while being read")
                if version_of(now) != manifest.version:
                    raise _Replaced
                # Evicted (maxmemory) or deleted: drop what is left of this version, so the item
                # reads as absent (and is written again) instead of failing on every read.
                self._client.unlink_if_head(key, manifest.head())
                self._client.unlink(self._keys.chunks(skey, manifest.version, manifest.chunks))
                self._count("incomplete_removed")
                raise EntryNotFoundError(f"entry {skey!r} was incomplete: chunk {i} of {manifest.chunks} is gone "
                                         "(evicted or deleted); what was left of it is removed")
            if len(chunk) != end - start:
                raise CorruptEntryError(f"entry {skey!r}: chunk {i} has {len(chunk)} bytes, "
                                        f"the manifest promises {end - start}")
            view[start:end] = chunk
        verify_payload(header, view, namespace=self._namespace, key=skey)

    # ------------------------------------------------------------------ exists / delete
    def _exists(self, skeys: list[str]) -> list[bool]:
        return self._client.exists_each([self._keys.entry(k) for k in skeys])

    def _delete(self, skeys: list[str]) -> None:
        for skey in skeys:
            old = self._client.take(self._keys.entry(skey), HEAD_LEN)
            version = version_of(old)
            count = Manifest.chunk_count(old) if version is not None else 0
            if version is not None and count:
                self._client.unlink(self._keys.chunks(skey, version, count))

    def _close(self) -> None:
        self._client.close()

    def describe(self) -> str:
        ns = f" namespace={self._namespace!r}" if self._namespace else ""
        return f"{self.config.location()}{ns}"
