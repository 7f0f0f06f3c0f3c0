"""Filesystem backend: the embedded default (local disk, /dev/shm, NFS, Lustre).

Layout, compatible with vLLM's ``ECExampleConnector``::

    <root>/[<namespace>/]<key>/encoder_cache.safetensors      (tensor "ec_cache")

Writes go to a unique temporary file in the entry's directory, then ``os.replace`` it over the
final name (atomic on POSIX filesystems, NFS included), so a concurrent reader sees the old or
the new entry, never a partial one; no file locks are taken. ``fsync=True`` also flushes the
file and its directory before the write returns.

Entries written by vLLM's ECExampleConnector (plain safetensors, no checksum) load too
(``accept_foreign``). ``max_bytes`` bounds the bytes this process keeps under ``root``
(LRU over what it wrote, read or found at start-up); ``ttl_s`` makes entries older than that
absent (removed when next touched).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

import torch

from ectransfer.backend import Backend, Capabilities
from ectransfer.backends._layout import ENTRY_FILE, TMP_PREFIX, entry_parts
from ectransfer.codec import (
    Checksum,
    EntryHeader,
    HashBeside,
    PayloadVerifier,
    check_destination,
    encode,
    header_length,
    parse_header,
    payload_view,
)
from ectransfer.config import BackendConfig, size
from ectransfer.errors import (
    CapacityError,
    ConfigError,
    CorruptEntryError,
    EntryNotFoundError,
    StorageIOError,
)

__all__ = ["ENTRY_FILE", "FsBackend", "FsConfig"]



@dataclasses.dataclass(frozen=True)
class FsConfig(BackendConfig):
    """Options of the fs backend (``file:///path?fsync=true&max_bytes=2GiB``)."""

    backend_name: ClassVar[str] = "fs"
    root: str = ""
    fsync: bool = False
    max_bytes: int | None = size(None)
    ttl_s: float | None = None
    create: bool = True
    accept_foreign: bool = True

    def validate(self) -> None:
        if not self.root:
            raise ConfigError("fs backend: option 'root' (or a file:// URL) is required")
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise ConfigError(f"fs backend: option 'ttl_s' must be > 0, got {self.ttl_s}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ConfigError(f"fs backend: option 'max_bytes' must be > 0, got {self.max_bytes}")


#: Payloads of at least this many bytes start on a page boundary of the file: the header is
#: padded with spaces (the safetensors format allows it), so a read copies whole pages instead
#: of straddling two per page (about 20% less CPU per 9.3 MB read on tmpfs; ectransfer-bench).
_PAGE = 4096
_ALIGN_MIN_PAYLOAD = 1 << 16
#: Payloads move in pieces of this size, each hashed right before it is written or right after
#: it is read, while it is still in cache: the checksum then costs no pass over memory of its own.
_PIECE = 1 << 20
#: From this size on, hashing runs on a second thread beside the write or the read: on a quiet
#: 16-core host the checksum otherwise costs about a third of a round trip (ectransfer-bench).
_PARALLEL_MIN = 2 << 20


def _write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _write_hashed(fd: int, payload: memoryview, checksum: Checksum, hasher: ThreadPoolExecutor) -> None:
    """Write ``payload`` while ``checksum`` takes it in: on a second thread for large payloads
    (xxhash and ``os.write`` both release the GIL, so the two run on two cores), else piece by
    piece on this one while each piece is still in cache."""
    if len(payload) >= _PARALLEL_MIN:
        future = hasher.submit(_update_in_pieces, checksum, payload)
        try:
            _write_all(fd, payload)
        finally:
            future.result()
        return
    _update_in_pieces(checksum, payload, fd)


def _update_in_pieces(checksum: Checksum, payload: memoryview, fd: int | None = None) -> None:
    for start in range(0, len(payload), _PIECE):
        piece = payload[start:start + _PIECE]
        checksum.update(piece)
        if fd is not None:
            _write_all(fd, piece)


def _read_verified(fd: int, view: memoryview, offset: int, verifier: PayloadVerifier,
                   hasher: ThreadPoolExecutor) -> int:
    """Fill ``view`` from ``offset`` piece by piece, feeding ``verifier``; return bytes read.

    For large payloads a second thread hashes each piece while the next one is read.
    """
    beside = HashBeside(hasher, verifier) if len(view) >= _PARALLEL_MIN else None
    got = 0
    try:
        while got < len(view):
            piece = view[got:got + _PIECE]
            n = os.preadv(fd, [piece], offset + got)
            if n == 0:
                break
            if beside is not None:
                beside.put(piece[:n])
            else:
                verifier.update(piece[:n])
            got += n
    finally:
        if beside is not None:
            beside.finish()
    return got


class FsBackend(Backend[FsConfig]):
    name = "fs"
    config_class = FsConfig
    capabilities = Capabilities(
        shared_across_hosts=True, persistent=True, ttl=True, zero_copy_device=False, peer_to_peer=False
    )

    def __init__(self, config: FsConfig) -> None:
        super().__init__(config)
        self.root = Path(config.root)
        try:
            if config.create:
                self.root.mkdir(parents=True, exist_ok=True)
            if not self.root.is_dir():
                raise ConfigError(f"fs backend: root {str(self.root)!r} is not a directory")
        except OSError as exc:
            raise StorageIOError(f"fs backend: cannot use root {str(self.root)!r}: {exc}") from exc
        self._lru: OrderedDict[str, int] | None = None
        self._lru_bytes = 0
        self._lru_lock = threading.Lock()
        # Hashes large payloads beside their write or read (see _write_hashed / _read_verified).
        self._hasher = ThreadPoolExecutor(4, thread_name_prefix="ectransfer-fs-hash")

    @classmethod
    def config_from_url(cls, url: str | None, options: Mapping[str, Any]) -> BackendConfig:
        fixed: dict[str, Any] = {}
        if url:
            if "://" in url:
                parts = urlsplit(url)
                if parts.netloc not in ("", "localhost"):
                    raise ConfigError(f"fs backend: file URLs name a local path, got host {parts.netloc!r}")
                fixed["root"] = unquote(parts.path)
            else:
                fixed["root"] = os.path.abspath(os.path.expanduser(url))
        return FsConfig.from_options(options, **fixed)

    # ------------------------------------------------------------------ paths
    def entry_path(self, skey: str) -> Path:
        """Where the entry for storage key ``skey`` lives (see :mod:`ectransfer.backends._layout`)."""
        return self.root.joinpath(*entry_parts(skey))

    def _expired(self, mtime: float) -> bool:
        return self.config.ttl_s is not None and time.time() - mtime > self.config.ttl_s

    # ------------------------------------------------------------------ write
    def _put(self, skey: str, tensor: torch.Tensor) -> None:
        align = _PAGE if tensor.numel() * tensor.element_size() >= _ALIGN_MIN_PAYLOAD else 0
        entry = encode(tensor, self._namespace, align=align, defer_checksum=True)
        final = self.entry_path(skey)
        for attempt in range(3):  # a concurrent delete may remove the directory under us
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp = final.parent / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
            except OSError as exc:
                raise self._io_error("write", skey, exc) from exc
        try:
            try:
                # Payload first (hashed piece by piece), then the sealed header at offset 0;
                # the file is a private temp file until the rename, so no reader sees it unsealed.
                os.lseek(fd, len(entry.header), os.SEEK_SET)
                checksum = entry.checksum()
                _write_hashed(fd, entry.payload, checksum, self._hasher)
                head = entry.seal(checksum.value())
                if os.pwrite(fd, head, 0) != len(head):
                    raise OSError(errno.EIO, "short header write")
                if self.config.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(exc, OSError):
                raise self._io_error("write", skey, exc) from exc
            raise
        if self.config.fsync:
            self._fsync_dir(final.parent)
        if self.config.max_bytes is not None:
            self._account(skey, entry.nbytes)

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        dfd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _io_error(self, op: str, skey: str, exc: OSError) -> Exception:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return CapacityError(f"fs backend: no space left to {op} entry {skey!r} under {str(self.root)!r}")
        return StorageIOError(f"fs backend: cannot {op} entry {skey!r}: {exc.strerror or exc}")

    # ------------------------------------------------------------------ read
    def _open_entry(self, skey: str) -> tuple[int, EntryHeader]:
        path = self.entry_path(skey)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise EntryNotFoundError(f"no entry for key {skey!r} under {str(self.root)!r}") from None
        except OSError as exc:
            raise self._io_error("read", skey, exc) from exc
        try:
            st = os.fstat(fd)
            if self._expired(st.st_mtime):
                raise EntryNotFoundError(f"entry {skey!r} expired (ttl_s={self.config.ttl_s})")
            head = os.pread(fd, min(st.st_size, 4096), 0)
            hlen = header_length(head)
            if hlen > len(head):
                head = os.pread(fd, hlen, 0)
            header = parse_header(head, key=skey)
            if st.st_size != header.total_len:
                raise CorruptEntryError(
                    f"entry {skey!r} has {st.st_size} bytes on disk, its header promises {header.total_len}"
                )
            if header.checksum is None and not self.config.accept_foreign:
                raise CorruptEntryError(f"entry {skey!r} carries no ectransfer checksum (accept_foreign=false)")
            return fd, header
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, EntryNotFoundError) and self.config.ttl_s is not None:
                self._delete([skey])
            raise

    def _read_payload(self, fd: int, header: EntryHeader, out: torch.Tensor, skey: str) -> None:
        view = payload_view(out)
        verifier = PayloadVerifier(header, namespace=self._namespace, key=skey)
        try:
            got = _read_verified(fd, view, header.header_len, verifier, self._hasher)
        except OSError as exc:
            raise self._io_error("read", skey, exc) from exc
        if got != header.nbytes:
            raise CorruptEntryError(f"entry {skey!r} is truncated: {got} of {header.nbytes} payload bytes")
        verifier.finish()
        if self._lru is not None:
            with self._lru_lock:
                if skey in self._lru:
                    self._lru.move_to_end(skey)

    def _get(self, skey: str) -> torch.Tensor:
        fd, header = self._open_entry(skey)
        try:
            out = torch.empty(header.shape, dtype=header.dtype)
            self._read_payload(fd, header, out, skey)
            return out
        finally:
            os.close(fd)

    def _get_into(self, skey: str, out: torch.Tensor) -> None:
        fd, header = self._open_entry(skey)
        try:
            if out.dtype != header.dtype or tuple(out.shape) != header.shape:
                # A header that lies about dtype/shape is corruption, not a caller error:
                # verify the entry as it stands before blaming the destination.
                staged = torch.empty(header.shape, dtype=header.dtype)
                self._read_payload(fd, header, staged, skey)
            check_destination(header, out, key=skey)
            self._read_payload(fd, header, out, skey)
        finally:
            os.close(fd)

    def _exists(self, skeys: list[str]) -> list[bool]:
        found = []
        for skey in skeys:
            try:
                st = os.stat(self.entry_path(skey))
            except FileNotFoundError:
                found.append(False)
                continue
            found.append(not self._expired(st.st_mtime))
        return found

    def _delete(self, skeys: list[str]) -> None:
        for skey in skeys:
            path = self.entry_path(skey)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise self._io_error("delete", skey, exc) from exc
            try:
                path.parent.rmdir()  # only if empty: a concurrent writer's temp file keeps it
            except OSError:
                pass
            if self._lru is not None:
                with self._lru_lock:
                    size_ = self._lru.pop(skey, None)
                    if size_ is not None:
                        self._lru_bytes -= size_

    # ------------------------------------------------------------------ capacity
    def _scan(self) -> OrderedDict[str, int]:
        found = []
        for dirpath, _dirs, files in os.walk(self.root):
            if ENTRY_FILE in files:
                p = Path(dirpath) / ENTRY_FILE
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                skey = "/".join(p.parent.relative_to(self.root).parts)
                found.append((max(st.st_atime, st.st_mtime), skey, st.st_size))
        found.sort()
        return OrderedDict((k, s) for _, k, s in found)

    def _account(self, skey: str, nbytes: int) -> None:
        limit = self.config.max_bytes
        assert limit is not None
        with self._lru_lock:
            if self._lru is None:
                self._lru = self._scan()
                self._lru_bytes = sum(self._lru.values())
            old = self._lru.pop(skey, None)
            if old is not None:
                self._lru_bytes -= old
            self._lru[skey] = nbytes
            self._lru_bytes += nbytes
            victims = []
            while self._lru_bytes > limit and len(self._lru) > 1:
                victim, vsize = next(iter(self._lru.items()))
                if victim == skey:
                    break
                del self._lru[victim]
                self._lru_bytes -= vsize
                victims.append(victim)
        if nbytes > limit:
            self._delete([skey])
            raise CapacityError(f"entry {skey!r} ({nbytes} bytes) exceeds max_bytes={limit}")
        for victim in victims:
            self._delete([victim])

    def _close(self) -> None:
        self._hasher.shutdown(wait=True)

    def describe(self) -> str:
        ns = f" namespace={self._namespace!r}" if self._namespace else ""
        return f"file://{self.root}{ns}"
