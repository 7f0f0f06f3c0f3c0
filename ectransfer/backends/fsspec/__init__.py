"""fsspec backend: S3 (through s3fs) and any other filesystem fsspec knows.

Layout and codec are the fs backend's (:mod:`ectransfer.backends._layout`)::

    <bucket>/<prefix>/[<namespace>/]<key>/encoder_cache.safetensors

so a bucket mounted elsewhere and an fs backend on that mount share entries.

* **Atomic visibility.** On object stores (s3, gcs, abfs, memory, ...) an entry is one PUT,
  or an upload in parts that becomes visible only when completed. Every other protocol
  (``file``, sftp, ...) writes a temporary file beside the entry and moves it over it.
  Readers verify the length and the checksum before returning anything.
* **Concurrency.** Every call runs as a coroutine on fsspec's I/O loop (sync filesystems in
  its worker threads); batches run ``max_concurrency`` requests at a time.
* **Bounds.** ``timeout_s`` is the connect and read timeout and the bound of each operation
  as a whole (a put in parts gets it per round of ``max_concurrency`` parts); retries happen
  inside it. A write that timed out may still land later: it is complete or absent.
* :meth:`FsspecBackend.clear` removes the entries under the prefix (only files named like
  entries, at entry depth). For expiry use the store's own rules (S3 lifecycle; docs/backends/s3.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import os
import posixpath
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from ectransfer.backend import Backend, Capabilities
from ectransfer.backends._layout import ENTRY_FILE, TMP_PREFIX, entry_parts
from ectransfer.backends.fsspec import _redact
from ectransfer.backends.fsspec._config import FsspecConfig, accepts, config_from_url, make_filesystem
from ectransfer.backends.fsspec._errors import translate
from ectransfer.codec import EncodedEntry, decode, encode, parse_header
from ectransfer.config import BackendConfig, redact_url
from ectransfer.errors import ConfigError, CorruptEntryError, ECTransferError

__all__ = ["FsspecBackend", "FsspecConfig"]

T = TypeVar("T")
_GRACE_S = 5.0  # the loop-side bound fires first; this only catches a loop that is stuck
_SECRET_OPTION = re.compile(r"pass|secret|token|key|credential|sas|signature", re.IGNORECASE)


class FsspecBackend(Backend[FsspecConfig]):
    """Entries as objects/files of an fsspec filesystem; see the module docstring."""

    name = "fsspec"
    config_class = FsspecConfig
    capabilities = Capabilities(
        shared_across_hosts=True, persistent=True, ttl=False, zero_copy_device=False, peer_to_peer=False
    )
    extra = "s3"

    def __init__(self, config: FsspecConfig) -> None:
        super().__init__(config)
        import fsspec.asyn

        self._s3 = config.protocol == "s3"
        self._root = config.root.rstrip("/") or "/"
        self._secrets = _redact.register([config.key, config.secret, config.token] + [
            v for k, v in config.storage_options.items() if isinstance(v, str) and _SECRET_OPTION.search(k)])
        try:
            self._fs = make_filesystem(config)
        except BaseException:
            _redact.forget(self._secrets)
            raise
        self._async = bool(getattr(self._fs, "async_impl", False))
        # Older s3fs releases lack these keywords (and pass unknown ones on to botocore).
        self._cat_kwargs = {"max_concurrency": 1} if self._s3 and accepts(self._fs._cat_file, "max_concurrency") else {}
        self._pipe_concurrency = self._s3 and accepts(self._fs._pipe_file, "max_concurrency")
        self._loop: asyncio.AbstractEventLoop = self._fs.loop if self._async else fsspec.asyn.get_loop()
        try:
            self._run(self._prepare(), "open", "the store")
        except (TypeError, ValueError) as exc:
            self._close()
            if isinstance(exc, ECTransferError):
                raise
            # s3fs hands unknown storage_options to botocore, which refuses them on first use
            raise ConfigError(f"fsspec backend: the {config.protocol} filesystem refused its options (check "
                              f"'storage_options'): {_redact.scrub(str(exc), self._secrets)}") from None
        except BaseException:
            self._close()
            raise

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        try:
            import fsspec  # noqa: F401
        except ImportError as exc:
            return False, f"fsspec is not installed ({exc})"
        return True, ""

    @classmethod
    def config_from_url(cls, url: str | None, options: Mapping[str, Any]) -> BackendConfig:
        return config_from_url(url, options)

    # ------------------------------------------------------------------ plumbing
    def entry_path(self, skey: str) -> str:
        """The filesystem path (for s3 ``bucket/key``) of the entry for storage key ``skey``."""
        return posixpath.join(self._root, *entry_parts(skey))

    @property
    def filesystem(self) -> Any:
        """The fsspec filesystem in use (for inspection and tests)."""
        return self._fs

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``fs.<method>``: the coroutine of an async filesystem, else the sync call in a thread."""
        if self._async:
            return await getattr(self._fs, f"_{method}")(*args, **kwargs)
        return await asyncio.to_thread(getattr(self._fs, method), *args, **kwargs)

    def _error(self, exc: BaseException, op: str, what: str, bound_s: float) -> BaseException:
        where = self.describe_location()
        return translate(exc, op=op, what=what, where=where, bucket=self.config.bucket if self._s3 else None,
                         timeout_s=bound_s, secrets=self._secrets)

    def _run(self, coro: Awaitable[T], op: str, what: str, bound_s: float | None = None) -> T:
        """Run ``coro`` on the loop within ``bound_s`` (default ``timeout_s``); typed errors."""
        bound = self.config.timeout_s if bound_s is None else bound_s
        fut = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, bound), self._loop)  # type: ignore[arg-type]
        try:
            return fut.result(bound + _GRACE_S)
        except BaseException as exc:
            fut.cancel()
            err = self._error(exc, op, what, bound)
            if err is exc:
                raise
            raise err from exc

    def _run_many(self, jobs: Sequence[tuple[Callable[[], Awaitable[T]], float]], op: str,
                  whats: Sequence[str]) -> list[T]:
        """Run ``(coroutine function, bound)`` jobs, ``max_concurrency`` at a time; raise the first failure."""
        conc = self.config.max_concurrency

        async def gather() -> list[Any]:
            sem = asyncio.Semaphore(conc)

            async def one(fn: Callable[[], Awaitable[T]], bound: float) -> T:
                async with sem:
                    return await asyncio.wait_for(fn(), bound)

            return await asyncio.gather(*(one(fn, b) for fn, b in jobs), return_exceptions=True)

        total = max(b for _, b in jobs) * math.ceil(len(jobs) / conc)
        fut = asyncio.run_coroutine_threadsafe(gather(), self._loop)
        try:
            results = fut.result(total + _GRACE_S)
        except concurrent.futures.TimeoutError as exc:  # only if the loop itself is stuck
            fut.cancel()
            raise self._error(exc, op, f"a batch of {_entries(len(jobs))}", total) from exc
        for (_, bound), what, r in zip(jobs, whats, results):
            if isinstance(r, BaseException):
                err = self._error(r, op, what, bound)
                if err is r:
                    raise r
                raise err from r
        return results

    # ------------------------------------------------------------------ open / close
    async def _prepare(self) -> None:
        if self._s3:
            await self._check_bucket()
        elif not self.config.atomic_put:
            await self._call("makedirs", self._root, exist_ok=True)

    async def _check_bucket(self) -> None:
        bucket = self.config.bucket
        try:
            await self._fs._call_s3("head_bucket", Bucket=bucket)
            return
        except FileNotFoundError:
            if not self.config.create_bucket:
                raise ConfigError(f"fsspec backend: s3 bucket {bucket!r} does not exist at {self.describe_location()} "
                                  "(create it, or pass create_bucket=true)") from None
        region = self.config.region
        where = {"CreateBucketConfiguration": {"LocationConstraint": region}} if region and region != "us-east-1" else {}
        try:
            await self._fs._call_s3("create_bucket", Bucket=bucket, **where)
        except FileExistsError:
            pass  # another process created it first

    def _close(self) -> None:
        _redact.forget(self._secrets)
        creator = getattr(self._fs, "_s3creator", None) if self._s3 else None
        if creator is not None and getattr(self._fs, "_s3", None) is not None:
            try:  # closes the aiohttp connection pool now rather than at garbage collection
                asyncio.run_coroutine_threadsafe(creator.__aexit__(None, None, None), self._loop).result(_GRACE_S)
            except Exception:  # noqa: BLE001 - closing must not raise; the pool dies with the process anyway
                pass
            self._fs._s3 = None

    # ------------------------------------------------------------------ write
    def _put_bound(self, nbytes: int) -> float:
        if not self._s3 or nbytes < self.config.multipart_threshold:
            return self.config.timeout_s
        at_once = self.config.max_concurrency if self._pipe_concurrency else 1
        rounds = math.ceil(math.ceil(nbytes / self.config.part_size) / at_once)
        return self.config.timeout_s * (2 + rounds)  # create + rounds of parts + complete

    def _pipe_kwargs(self, nbytes: int) -> dict[str, Any]:
        if not self._s3:
            return {}
        # s3fs uploads in parts of `chunksize` when the data holds two of them or more.
        below = nbytes < self.config.multipart_threshold
        chunk = max(self.config.part_size, nbytes) if below else self.config.part_size
        if self._pipe_concurrency:
            return {"chunksize": chunk, "max_concurrency": self.config.max_concurrency}
        return {"chunksize": chunk}

    def _encode(self, tensor: torch.Tensor) -> tuple[EncodedEntry, bytes | None]:
        """The entry, and for single writes its bytes (joined here, in the caller's thread,
        not on the shared I/O loop). s3fs needs bytes: botocore refuses memoryviews."""
        entry = encode(tensor, self._namespace)
        return entry, entry.to_bytes() if self.config.atomic_put else None

    async def _write(self, skey: str, entry: EncodedEntry, blob: bytes | None) -> None:
        path = self.entry_path(skey)
        if blob is not None:
            await self._call("pipe_file", path, blob, **self._pipe_kwargs(len(blob)))
            return
        parent = posixpath.dirname(path)
        tmp = posixpath.join(parent, f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
        try:
            for attempt in range(3):  # a concurrent delete may remove the directory under us
                try:
                    await self._call("makedirs", parent, exist_ok=True)
                    await asyncio.to_thread(self._write_file, tmp, entry)
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise
            await self._call("mv", tmp, path)
        except BaseException:
            try:
                await self._call("rm_file", tmp)
            except Exception:  # noqa: BLE001 - best effort; clear() removes stray temp files
                pass
            raise

    def _write_file(self, path: str, entry: EncodedEntry) -> None:
        with self._fs.open(path, "wb") as f:  # header and payload written apart: no join
            f.write(entry.header)
            f.write(entry.payload)

    def _put(self, skey: str, tensor: torch.Tensor) -> None:
        entry, blob = self._encode(tensor)
        self._run(self._write(skey, entry, blob), "write", repr(skey), self._put_bound(entry.nbytes))

    async def _encode_write(self, skey: str, tensor: torch.Tensor) -> None:
        # Encoding (checksum, join) in a worker thread overlaps other items' requests.
        entry, blob = await asyncio.to_thread(self._encode, tensor)
        await self._write(skey, entry, blob)

    def _put_many(self, items: list[tuple[str, torch.Tensor]]) -> None:
        jobs = [(lambda s=skey, t=t: self._encode_write(s, t), self._put_bound(t.numel() * t.element_size()))
                for skey, t in items]
        self._run_many(jobs, "write", [repr(s) for s, _ in items])

    # ------------------------------------------------------------------ read
    async def _read(self, skey: str) -> bytes:
        # max_concurrency=1: one GET; s3fs would first HEAD the object to plan ranged reads.
        data: bytes = await self._call("cat_file", self.entry_path(skey), **self._cat_kwargs)
        return data

    def _decode(self, skey: str, data: bytes, out: torch.Tensor | None) -> torch.Tensor:
        if not self.config.accept_foreign and parse_header(data, key=skey).checksum is None:
            raise CorruptEntryError(f"entry {skey!r} carries no ectransfer checksum (accept_foreign=false)")
        return decode(data, namespace=self._namespace, out=out, key=skey)

    def _get(self, skey: str) -> torch.Tensor:
        return self._decode(skey, self._run(self._read(skey), "read", repr(skey)), None)

    def _get_into(self, skey: str, out: torch.Tensor) -> None:
        self._decode(skey, self._run(self._read(skey), "read", repr(skey)), out)

    async def _read_decode(self, skey: str, out: torch.Tensor | None) -> torch.Tensor:
        # Verifying and copying in a worker thread overlaps other items' requests, and frees
        # each item's bytes as soon as it is decoded.
        data = await self._read(skey)
        return await asyncio.to_thread(self._decode, skey, data, out)

    def _get_many(self, skeys: list[str]) -> list[torch.Tensor]:
        jobs = [(lambda s=skey: self._read_decode(s, None), self.config.timeout_s) for skey in skeys]
        return self._run_many(jobs, "read", [repr(s) for s in skeys])

    def _get_many_into(self, skeys: list[str], outs: list[torch.Tensor]) -> None:
        jobs = [(lambda s=skey, o=out: self._read_decode(s, o), self.config.timeout_s)
                for skey, out in zip(skeys, outs)]
        self._run_many(jobs, "read", [repr(s) for s in skeys])

    # ------------------------------------------------------------------ exists / delete
    async def _exists_one(self, skey: str) -> bool:
        path = self.entry_path(skey)
        if not self._s3:
            return bool(await self._call("exists", path))
        bucket, key = path.split("/", 1)
        try:  # one HEAD: s3fs's exists() also lists the "directory" when the key is absent
            await self._fs._call_s3("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return False
        return True

    def _exists(self, skeys: list[str]) -> list[bool]:
        jobs = [(lambda s=skey: self._exists_one(s), self.config.timeout_s) for skey in skeys]
        return self._run_many(jobs, "check", [repr(s) for s in skeys])

    async def _remove(self, paths: list[str]) -> None:
        if self._s3:
            for i in range(0, len(paths), 1000):  # one DeleteObjects request per 1000 keys
                await self._fs._rm(paths[i:i + 1000])
            return
        for path in paths:
            try:
                await self._call("rm_file", path)
            except FileNotFoundError:
                pass
            if not self.config.atomic_put:
                try:  # only if empty: a concurrent writer's temp file keeps it
                    await self._call("rmdir", posixpath.dirname(path))
                except OSError:
                    pass

    def _delete(self, skeys: list[str]) -> None:
        paths = [self.entry_path(k) for k in skeys]
        bound = self.config.timeout_s * math.ceil(len(paths) / (1000 if self._s3 else 100))
        self._run(self._remove(paths), "delete", _entries(len(paths)), bound)

    # ------------------------------------------------------------------ clean-up
    def clear(self, *, all_namespaces: bool = False) -> int:
        """Delete the ectransfer entries under the prefix; return how many were deleted.

        Only objects named like entries (``encoder_cache.safetensors``, and writers' temporary
        files) at entry depth are touched: those of this backend's namespace (entries without a
        namespace when it has none), or of every namespace with ``all_namespaces=True``.
        Anything else under the prefix stays. A put racing with ``clear`` may fail or survive.
        """
        self._check_open()
        bound = self.config.timeout_s * 10
        found: list[str] = self._run(self._call("find", self._root), "list", "the entries", bound)
        ns_part = entry_parts(f"{self._namespace}/x")[0] if self._namespace else None
        victims, entries = [], 0
        base = self._root.rstrip("/") + "/"
        for path in found:
            rel = path[len(base):].split("/") if path.startswith(base) else []
            if not rel or not (rel[-1] == ENTRY_FILE or rel[-1].startswith(TMP_PREFIX)):
                continue
            dirs = rel[:-1]
            mine = (len(dirs) in (1, 2)) if all_namespaces else (
                dirs[:1] == [ns_part] and len(dirs) == 2 if ns_part else len(dirs) == 1)
            if mine:
                victims.append(path)
                entries += rel[-1] == ENTRY_FILE
        if victims:
            bound = self.config.timeout_s * math.ceil(len(victims) / (1000 if self._s3 else 100))
            self._run(self._remove(victims), "delete", _entries(len(victims)), bound)
        return entries

    # ------------------------------------------------------------------ description
    def describe_location(self) -> str:
        """Where the entries live, without credentials: ``s3://bucket/prefix via http://endpoint``."""
        endpoint = f" via {redact_url(self.config.endpoint_url)}" if self.config.endpoint_url else ""
        return f"{self.config.protocol}://{self._root}{endpoint}"

    def describe(self) -> str:
        ns = f" namespace={self._namespace!r}" if self._namespace else ""
        return f"{self.describe_location()}{ns}"


def _entries(n: int) -> str:
    return f"{n} entry" if n == 1 else f"{n} entries"
