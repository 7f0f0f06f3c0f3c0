"""Where an item lives in Redis, and the manifest of a chunked item.

Every key of one item carries the storage key as a Cluster hash tag, so they share one slot::

    <prefix>:{<skey>}                             the entry: wire-codec bytes, or a manifest
    <prefix>:{<skey>}:c:<version hex>:<i>         chunk i of a chunked item's payload

Storage keys never contain ``{`` or ``}`` (see :mod:`ectransfer.keys`), so the tag is exactly
the storage key. An entry that fits in ``chunk_bytes`` is stored whole under the entry key (one
SET, one GET, and the value is a plain safetensors blob). A larger one is a **manifest**: a
64-byte binary head (magic, version, chunk count and sizes) followed by the entry's safetensors
header; its payload is split into chunks under keys unique to this version. A wire-codec entry
starts with its little-endian u64 header length (< 2^20), so it never starts with the magic.
"""

from __future__ import annotations

import dataclasses
import math
import struct

from ectransfer.codec import EntryHeader, parse_header
from ectransfer.errors import CorruptEntryError

__all__ = ["HEAD_LEN", "MAGIC", "Keys", "Manifest", "version_of"]

MAGIC = b"ECTRCHNK"
HEAD_LEN = 64
_HEAD = struct.Struct("<8s16sIQQI")  # magic, version, chunks, payload bytes, chunk bytes, header bytes
_VERSION_LEN = 16


def version_of(head: bytes) -> bytes | None:
    """The version recorded in a value's first bytes, or None if the value is not a manifest."""
    if len(head) >= 8 + _VERSION_LEN and head[:8] == MAGIC:
        return bytes(head[8 : 8 + _VERSION_LEN])
    return None


@dataclasses.dataclass(frozen=True)
class Keys:
    """Redis key names for one ``key_prefix``."""

    prefix: str

    def entry(self, skey: str) -> str:
        return f"{self.prefix}:{{{skey}}}" if self.prefix else f"{{{skey}}}"

    def chunks(self, skey: str, version: bytes, count: int) -> list[str]:
        base = f"{self.entry(skey)}:c:{version.hex()}:"
        return [f"{base}{i}" for i in range(count)]


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a chunked item's entry key holds."""

    version: bytes
    chunks: int
    payload_len: int
    chunk_len: int
    header: bytes  # the entry's safetensors header (u64 length + JSON)

    @classmethod
    def plan(cls, version: bytes, header: bytes, payload_len: int, chunk_len: int) -> Manifest:
        return cls(version, math.ceil(payload_len / chunk_len), payload_len, chunk_len, header)

    def encode(self) -> bytes:
        head = _HEAD.pack(MAGIC, self.version, self.chunks, self.payload_len, self.chunk_len, len(self.header))
        return head.ljust(HEAD_LEN, b"\0") + self.header

    @staticmethod
    def chunk_count(head: bytes) -> int:
        """The chunk count recorded in a manifest's head (0 if the head is too short to say)."""
        return int(_HEAD.unpack_from(head)[2]) if len(head) >= _HEAD.size else 0

    def head(self) -> bytes:
        return self.encode()[:HEAD_LEN]

    def spans(self) -> list[tuple[int, int]]:
        """``(start, end)`` of each chunk within the payload."""
        return [(i * self.chunk_len, min((i + 1) * self.chunk_len, self.payload_len)) for i in range(self.chunks)]

    @classmethod
    def decode(cls, value: bytes, *, key: str) -> tuple[Manifest, EntryHeader]:
        """Parse and cross-check a manifest; :class:`CorruptEntryError` if anything disagrees."""
        if len(value) < HEAD_LEN:
            raise CorruptEntryError(f"entry {key!r} has a truncated chunk manifest ({len(value)} bytes)")
        magic, version, chunks, payload_len, chunk_len, header_len = _HEAD.unpack_from(value)
        if magic != MAGIC or header_len != len(value) - HEAD_LEN or chunk_len == 0 \
                or chunks != math.ceil(payload_len / chunk_len):
            raise CorruptEntryError(f"entry {key!r} has an inconsistent chunk manifest "
                                    f"({chunks} chunks of {chunk_len} for {payload_len} bytes)")
        header_bytes = bytes(value[HEAD_LEN:])
        header = parse_header(header_bytes, key=key)
        if header.header_len != len(header_bytes) or header.nbytes != payload_len:
            raise CorruptEntryError(f"entry {key!r}: manifest promises {payload_len} payload bytes, "
                                    f"its header {header.nbytes}")
        return cls(version, chunks, payload_len, chunk_len, header_bytes), header
