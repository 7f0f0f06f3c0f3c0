"""The wire codec: one safetensors entry per item.

Layout (the safetensors format, readable by ``safetensors.torch.load``)::

    u64 little-endian N | N bytes of JSON header (space padded to 8) | payload bytes

The header holds one tensor, ``ec_cache`` (the name vLLM's ``ECExampleConnector`` uses), and
``__metadata__`` with the format version, the namespace and a checksum. The checksum is
xxh3-64 over a description of the tensor (dtype, shape, namespace) followed by the payload, so
a flipped payload byte *and* a header that lies about dtype or shape are both detected.

Entries with no ``__metadata__`` at all (written by vLLM's ``ECExampleConnector`` or plain
``safetensors.torch.save_file``) are *foreign*: structurally validated, but they carry no
checksum to verify. Metadata that is present but incomplete is corruption.

The encoder never copies the payload: :func:`encode` returns the header bytes and a
memoryview of the tensor's own storage, so byte-oriented backends can scatter/gather them.
No pickle anywhere.
"""

from __future__ import annotations

import json
import math
import queue
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import xxhash

from ectransfer.errors import CorruptEntryError, IncompatibleTensorError

__all__ = [
    "COPY_PIECE",
    "FORMAT_VERSION",
    "TENSOR_NAME",
    "Checksum",
    "EncodedEntry",
    "EntryHeader",
    "HashBeside",
    "decode",
    "encode",
    "header_length",
    "PayloadVerifier",
    "parse_header",
    "payload_view",
    "verify_payload",
]

FORMAT_VERSION = "1"
TENSOR_NAME = "ec_cache"
_META_FORMAT = "ectransfer.format"
_META_CHECKSUM = "ectransfer.checksum"
_META_NAMESPACE = "ectransfer.namespace"
_MAX_HEADER = 1 << 20  # a one-tensor header is a few hundred bytes; refuse absurd lengths
_MAX_RANK = 32

_DTYPE_TO_ST: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_ST_TO_DTYPE = {v: k for k, v in _DTYPE_TO_ST.items()}


@dataclass(frozen=True)
class EntryHeader:
    """What the header of an entry says, after validation."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    header_len: int  # 8 + N: offset of the payload in the entry
    nbytes: int  # payload length
    checksum: str | None  # None for foreign entries
    namespace: str | None  # None for foreign entries
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def total_len(self) -> int:
        return self.header_len + self.nbytes


_PLACEHOLDER = "xxh3_64:" + "0" * 16  # as long as every real checksum: sealing keeps the header length


class Checksum:
    """Incremental entry checksum: xxh3-64 over ``dtype|shape|namespace|`` then the payload.

    Feed the payload in pieces (:meth:`update`) while each piece is still in cache — that is
    what lets a backend hash while it copies instead of making a pass of its own.
    """

    def __init__(self, dtype_name: str, shape: tuple[int, ...], namespace: str) -> None:
        self._h = xxhash.xxh3_64()
        self._h.update(f"{dtype_name}|{','.join(map(str, shape))}|{namespace}|".encode())

    def update(self, data: Any) -> None:
        self._h.update(data)

    def value(self) -> str:
        return "xxh3_64:" + self._h.hexdigest()


class _Sink(Protocol):
    def update(self, piece: Any) -> None: ...


class HashBeside:
    """``sink.update(piece)`` for every :meth:`put` piece, in order, on a thread of ``pool``.

    xxhash releases the GIL on large inputs, as do ``os.preadv``, numpy copies and NIXL's
    ``transfer()``: a piece that has landed can be hashed on a second core while the caller
    moves the next one. :meth:`finish` waits until every piece is taken in (re-raising what the
    sink raised); call it exactly once, also on error paths, so the pool thread is never left
    waiting.
    """

    def __init__(self, pool: ThreadPoolExecutor, sink: _Sink) -> None:
        self._pieces: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._future: Future[None] = pool.submit(self._drain, sink)

    def _drain(self, sink: _Sink) -> None:
        while (piece := self._pieces.get()) is not None:
            sink.update(piece)

    def put(self, piece: Any) -> None:
        self._pieces.put(piece)

    def finish(self) -> None:
        self._pieces.put(None)
        self._future.result()


#: granule of :meth:`EncodedEntry.copy_into`: one piece stays in cache between copy and hash
COPY_PIECE = 1 << 20


@dataclass(frozen=True)
class EncodedEntry:
    """An encoded entry: ``header`` then ``payload`` (a view of the tensor's storage).

    An entry encoded with ``defer_checksum=True`` carries a placeholder checksum: hash the
    payload with :meth:`checksum` while writing it, then write :meth:`seal`'s header (same
    length) before the entry becomes visible.
    """

    header: bytes
    payload: memoryview
    tensor: torch.Tensor  # keeps the storage behind ``payload`` alive
    dtype_name: str = ""
    namespace: str = ""
    sealed: bool = True

    @property
    def nbytes(self) -> int:
        return len(self.header) + len(self.payload)

    def to_bytes(self) -> bytes:
        """Join header and payload (one copy); prefer writing the two parts separately."""
        if not self.sealed:
            raise ValueError("entry checksum is deferred: seal() the header first")
        return b"".join((self.header, self.payload))

    def checksum(self) -> Checksum:
        """A fresh :class:`Checksum` for this entry's payload."""
        return Checksum(self.dtype_name, tuple(self.tensor.shape), self.namespace)

    def seal(self, checksum: str) -> bytes:
        """The header with ``checksum`` in place of the placeholder (same length)."""
        if len(checksum) != len(_PLACEHOLDER):
            raise ValueError(f"checksum {checksum!r} has the wrong length")
        return self.header.replace(_PLACEHOLDER.encode(), checksum.encode(), 1)

    def copy_into(self, view: np.ndarray, beside: ThreadPoolExecutor | None = None) -> bytes:
        """Copy the whole entry into the uint8 array ``view`` and return the header written.

        A deferred checksum is computed from the copy, one :data:`COPY_PIECE` at a time while
        that piece is still in cache (one pass over the payload instead of two), and the
        sealed header is written last: what ``view`` holds is what the checksum vouches for.
        With ``beside`` (a pool) each copied piece is hashed on a pool thread while the next
        one is copied (:class:`HashBeside`).
        """
        h, n = len(self.header), len(self.payload)
        if len(view) < h + n:
            raise ValueError(f"entry of {h + n} bytes does not fit in {len(view)}")
        src = np.frombuffer(self.payload, dtype=np.uint8)
        checksum = None if self.sealed else self.checksum()
        hashing = HashBeside(beside, checksum) if checksum is not None and beside is not None else None
        try:
            for start in range(0, n, COPY_PIECE):
                dst = view[h + start : h + min(start + COPY_PIECE, n)]
                np.copyto(dst, src[start : start + len(dst)])
                if hashing is not None:
                    hashing.put(dst)
                elif checksum is not None:
                    checksum.update(dst)
        finally:
            if hashing is not None:
                hashing.finish()
        header = self.header if checksum is None else self.seal(checksum.value())
        view[:h] = np.frombuffer(header, dtype=np.uint8)
        return header


def _checksum(dtype_name: str, shape: tuple[int, ...], namespace: str, payload: Any) -> str:
    h = Checksum(dtype_name, shape, namespace)
    h.update(payload)
    return h.value()


def payload_view(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's storage (no copy)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("payload_view needs a contiguous CPU tensor")
    flat = tensor.reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")  # type: ignore[arg-type]


def encode(tensor: torch.Tensor, namespace: str = "", *, align: int = 0,
           defer_checksum: bool = False) -> EncodedEntry:
    """Encode ``tensor`` (any rank, any strides, CPU) as a safetensors entry.

    ``align``: pad the header (with spaces, as safetensors allows) so the payload starts at a
    multiple of ``align`` bytes — whole-page reads and writes for file-backed stores.
    ``defer_checksum``: leave a placeholder (see :class:`EncodedEntry`) instead of hashing now.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    dtype_name = _DTYPE_TO_ST.get(tensor.dtype)
    if dtype_name is None:
        raise IncompatibleTensorError(f"dtype {tensor.dtype} is not supported by the wire codec")
    if tensor.device.type != "cpu":
        raise IncompatibleTensorError("encode() takes CPU tensors; stage device tensors first")
    tensor = tensor.detach().contiguous()
    shape = tuple(tensor.shape)
    payload = payload_view(tensor)
    meta = {
        _META_FORMAT: FORMAT_VERSION,
        _META_NAMESPACE: namespace,
        _META_CHECKSUM: _PLACEHOLDER if defer_checksum else _checksum(dtype_name, shape, namespace, payload),
    }
    hdr = {
        "__metadata__": meta,
        TENSOR_NAME: {"dtype": dtype_name, "shape": list(shape), "data_offsets": [0, len(payload)]},
    }
    raw = json.dumps(hdr, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    if align > 1:
        raw += b" " * (-(8 + len(raw)) % align)
    return EncodedEntry(struct.pack("<Q", len(raw)) + raw, payload, tensor, dtype_name, namespace,
                        sealed=not defer_checksum)


def header_length(first8: bytes | memoryview) -> int:
    """Total header length (8 + N) given the entry's first 8 bytes."""
    if len(first8) < 8:
        raise CorruptEntryError(f"entry is truncated: {len(first8)} bytes, not even a header length")
    n: int = struct.unpack("<Q", bytes(first8[:8]))[0]
    if n == 0 or n > _MAX_HEADER:
        raise CorruptEntryError(f"entry has an impossible header length {n}")
    return 8 + n


def parse_header(prefix: bytes | memoryview, *, key: str = "?") -> EntryHeader:
    """Validate and parse the header at the start of ``prefix`` (which may hold more bytes)."""
    hlen = header_length(prefix)
    if len(prefix) < hlen:
        raise CorruptEntryError(f"entry {key!r} is truncated inside its header")
    try:
        obj = json.loads(bytes(prefix[8:hlen]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptEntryError(f"entry {key!r} has an unreadable header: {exc}") from None
    if not isinstance(obj, dict):
        raise CorruptEntryError(f"entry {key!r} header is not a JSON object")
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptEntryError(f"entry {key!r} has malformed __metadata__")
    if list(obj) != [TENSOR_NAME]:
        raise CorruptEntryError(f"entry {key!r} must hold exactly one tensor {TENSOR_NAME!r}, has {sorted(obj)}")
    info = obj[TENSOR_NAME]
    try:
        dtype = _ST_TO_DTYPE[info["dtype"]]
        shape = tuple(info["shape"])
        start, end = info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise CorruptEntryError(f"entry {key!r} has an invalid tensor description {info!r}") from None
    if len(shape) > _MAX_RANK or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CorruptEntryError(f"entry {key!r} has an impossible shape {list(shape)}")
    nbytes = math.prod(shape) * dtype.itemsize
    if start != 0 or end != nbytes:
        raise CorruptEntryError(
            f"entry {key!r} header is inconsistent: offsets {[start, end]} for {nbytes} bytes of {info['dtype']}{list(shape)}"
        )
    if not meta:  # foreign: vLLM's ECExampleConnector and safetensors.save_file write none
        return EntryHeader(dtype, shape, hlen, nbytes, None, None, {})
    # Metadata present must be ours and complete: otherwise one flipped byte in a metadata
    # key would turn a checksummed entry into an unchecked "foreign" one.
    missing = [k for k in (_META_FORMAT, _META_CHECKSUM, _META_NAMESPACE) if k not in meta]
    if missing:
        raise CorruptEntryError(f"entry {key!r} has metadata without {', '.join(missing)}")
    if meta[_META_FORMAT] != FORMAT_VERSION:
        raise CorruptEntryError(f"entry {key!r} has unknown format version {meta[_META_FORMAT]!r}")
    return EntryHeader(dtype, shape, hlen, nbytes, meta[_META_CHECKSUM], meta[_META_NAMESPACE], meta)


class PayloadVerifier:
    """:func:`verify_payload` in pieces: :meth:`update` each piece as it lands (still in cache),
    then :meth:`finish`, which raises :class:`CorruptEntryError` on any mismatch."""

    def __init__(self, header: EntryHeader, *, namespace: str = "", key: str = "?") -> None:
        if header.checksum is not None and header.namespace != namespace:
            raise CorruptEntryError(f"entry {key!r} belongs to namespace {header.namespace!r}, not {namespace!r}")
        self.header = header
        self.key = key
        self._seen = 0
        self._h = (Checksum(_DTYPE_TO_ST[header.dtype], header.shape, header.namespace or "")
                   if header.checksum is not None else None)

    def update(self, piece: Any) -> None:
        self._seen += len(piece)
        if self._h is not None:
            self._h.update(piece)

    def finish(self) -> None:
        if self._seen != self.header.nbytes:
            raise CorruptEntryError(
                f"entry {self.key!r} is truncated: payload {self._seen} of {self.header.nbytes} bytes")
        if self._h is not None and (actual := self._h.value()) != self.header.checksum:
            raise CorruptEntryError(f"entry {self.key!r} failed its checksum ({actual} != {self.header.checksum})")


def verify_payload(header: EntryHeader, payload: Any, *, namespace: str = "", key: str = "?") -> None:
    """Raise :class:`CorruptEntryError` unless ``payload`` matches ``header``'s checksum.

    Foreign entries (no checksum) pass. A namespace recorded in the entry must equal
    ``namespace``: two models sharing a store never read each other's embeddings.
    """
    if len(payload) != header.nbytes:
        raise CorruptEntryError(f"entry {key!r} is truncated: payload {len(payload)} of {header.nbytes} bytes")
    verifier = PayloadVerifier(header, namespace=namespace, key=key)
    verifier.update(payload)
    verifier.finish()


def check_destination(header: EntryHeader, out: torch.Tensor, *, key: str = "?") -> None:
    """Raise :class:`IncompatibleTensorError` unless ``out`` can receive the entry."""
    if out.dtype != header.dtype or tuple(out.shape) != header.shape:
        raise IncompatibleTensorError(
            f"entry {key!r} is {header.dtype}{list(header.shape)}, destination is {out.dtype}{list(out.shape)}"
        )
    if not out.is_contiguous():
        raise IncompatibleTensorError("get_into needs a contiguous destination tensor")


def decode(
    data: bytes | bytearray | memoryview,
    *,
    namespace: str = "",
    out: torch.Tensor | None = None,
    key: str = "?",
) -> torch.Tensor:
    """Validate an entire entry and copy its tensor into ``out`` (or a new CPU tensor).

    Raises :class:`CorruptEntryError` for any truncation, trailing garbage, bad header or
    checksum mismatch; nothing is written to ``out`` in that case.
    """
    view = memoryview(data).cast("B")
    header = parse_header(view, key=key)
    if len(view) != header.total_len:
        raise CorruptEntryError(
            f"entry {key!r} has {len(view)} bytes, its header promises {header.total_len}"
        )
    payload = view[header.header_len :]
    verify_payload(header, payload, namespace=namespace, key=key)
    if out is None:
        out = torch.empty(header.shape, dtype=header.dtype)
    else:
        check_destination(header, out, key=key)
    if header.nbytes:
        if out.device.type == "cpu":
            np.copyto(np.asarray(payload_view(out)), np.frombuffer(payload, dtype=np.uint8))
        else:
            staged = torch.empty(header.shape, dtype=header.dtype)
            np.copyto(np.asarray(payload_view(staged)), np.frombuffer(payload, dtype=np.uint8))
            out.copy_(staged)
    return out
