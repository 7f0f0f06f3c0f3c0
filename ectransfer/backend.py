"""The backend contract: the transport behind every connector.

A backend stores one tensor per key. Subclasses implement a handful of *primitives* that take
already-validated **storage keys** (``"<namespace>/<key>"``, see :mod:`ectransfer.keys`) and
contiguous CPU tensors; the public methods validate keys, apply the namespace, stage device
tensors through host memory and refuse use after :meth:`Backend.close`.

=====================  ==================================================================
primitive              contract
=====================  ==================================================================
``_put(skey, t)``      store ``t`` (contiguous, CPU) under ``skey``, replacing any previous
                       entry atomically: a concurrent reader sees the old or the new entry,
                       never a mix or a partial one.
``_get(skey)``         return a new CPU tensor; :class:`EntryNotFoundError` if absent,
                       :class:`CorruptEntryError` if it fails validation (never the data).
``_exists(skeys)``     one bool per key; no side effects beyond LRU bookkeeping.
``_delete(skeys)``     remove the entries; absent keys are ignored.
``_close()``           release connections, threads, registered memory. Called once.
``_release(skeys)``    optional (default: nothing): the reader is done with these entries.
                       Peer-to-peer backends free the writer's copy; stores ignore it.
=====================  ==================================================================

Composites with defaults built on the primitives — ``_get_into`` (override for zero-copy
into the caller's buffer), ``_put_many``, ``_get_many``, ``_get_many_into`` — should be
overridden where the transport can do better (pipelines, batch RPCs, parallel requests).

Every primitive must be thread-safe: the connector core calls them from a thread pool.
Every network call must be bounded by ``config.timeout_s`` and fail with
:class:`TransferTimeoutError` or :class:`BackendConnectionError`.

Backends never import vLLM, and import their optional dependency lazily so that
``ectransfer backends`` can list them without it.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar, Generic, TypeVar

import torch

from ectransfer.config import BackendConfig
from ectransfer.errors import BackendClosedError, IncompatibleTensorError
from ectransfer.keys import storage_key, validate_key, validate_keys

__all__ = ["Backend", "Capabilities"]

CfgT = TypeVar("CfgT", bound=BackendConfig)


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend can do; read-only, declared by every backend class.

    shared_across_hosts: a reader on another host sees what a writer stored.
    persistent: entries survive closing the backend (and the writing process).
    ttl: entries can expire after a configured time.
    zero_copy_device: ``get_into`` can land bytes directly in device (GPU) memory.
    peer_to_peer: data lives with the writer and is pulled by readers (no central store);
        the writer's process must stay alive until readers are done.
    """

    shared_across_hosts: bool
    persistent: bool
    ttl: bool
    zero_copy_device: bool
    peer_to_peer: bool


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    return tensor.contiguous()


class Backend(abc.ABC, Generic[CfgT]):
    """Base class of every transport. See the module docstring for the contract."""

    #: registry name (``"fs"``, ``"redis"``, ...)
    name: ClassVar[str]
    #: the typed configuration class
    config_class: ClassVar[type[BackendConfig]]
    #: what the backend can do
    capabilities: ClassVar[Capabilities]
    #: the pip extra that installs the optional dependency, if any
    extra: ClassVar[str | None] = None

    def __init__(self, config: CfgT) -> None:
        self.config: CfgT = config
        self._namespace = config.namespace
        self._closed = False

    # ----------------------------------------------------------------- construction
    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        """``(True, "")`` if the backend can be used here, else ``(False, why)``; never raises."""
        return True, ""

    @classmethod
    def config_from_url(cls, url: str | None, options: Mapping[str, Any]) -> BackendConfig:
        """Turn a URL (query already split off) and options into the typed config.

        Backends whose URL carries settings (host, path, bucket) override this.
        """
        return cls.config_class.from_options(options)

    @classmethod
    def open(cls, url: str | None = None, **options: Any) -> Backend[Any]:
        """Build a backend from a URL and options (what :func:`ectransfer.open_backend` calls)."""
        return cls(cls.config_from_url(url, options))  # type: ignore[arg-type]

    # ----------------------------------------------------------------- primitives
    @abc.abstractmethod
    def _put(self, skey: str, tensor: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def _get(self, skey: str) -> torch.Tensor: ...

    @abc.abstractmethod
    def _exists(self, skeys: list[str]) -> list[bool]: ...

    @abc.abstractmethod
    def _delete(self, skeys: list[str]) -> None: ...

    def _close(self) -> None:
        """Release resources; default: nothing to release."""

    def _release(self, skeys: list[str]) -> None:
        """The reader is done with ``skeys``; default: nothing to do (stores keep entries)."""

    # ----------------------------------------------------------------- composites
    def _get_into(self, skey: str, out: torch.Tensor) -> None:
        """Fill ``out`` (contiguous; CPU unless ``zero_copy_device``). Override for zero-copy."""
        t = self._get(skey)
        if t.dtype != out.dtype or t.shape != out.shape:
            raise IncompatibleTensorError(
                f"entry {skey!r} is {t.dtype}{list(t.shape)}, destination is {out.dtype}{list(out.shape)}"
            )
        out.copy_(t)

    def _put_many(self, items: list[tuple[str, torch.Tensor]]) -> None:
        for skey, t in items:
            self._put(skey, t)

    def _get_many(self, skeys: list[str]) -> list[torch.Tensor]:
        return [self._get(k) for k in skeys]

    def _get_many_into(self, skeys: list[str], outs: list[torch.Tensor]) -> None:
        for k, o in zip(skeys, outs):
            self._get_into(k, o)

    # ----------------------------------------------------------------- public API
    @property
    def namespace(self) -> str:
        return self._namespace

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise BackendClosedError(f"{self.name} backend is closed")

    def _skey(self, key: object) -> str:
        return storage_key(self._namespace, validate_key(key))

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Store ``tensor`` under ``key``, replacing any previous entry.

        Device tensors are staged through a reused pinned buffer (see
        :mod:`ectransfer.connector.staging`) unless the backend is ``zero_copy_device``.
        """
        skey = self._skey(key)
        self._check_open()
        if isinstance(tensor, torch.Tensor) and tensor.device.type == "cuda" \
                and not self.capabilities.zero_copy_device:
            from ectransfer.connector.staging import default_pool, to_host_async

            staged = to_host_async(tensor, default_pool(), self.config.timeout_s)
            try:
                self._put(skey, staged.wait())
            finally:
                staged.release()
            return
        self._put(skey, _to_host(tensor))

    def get(self, key: str, *, device: torch.device | str | None = None) -> torch.Tensor:
        """Return the tensor stored under ``key`` (a new tensor, on ``device`` if given)."""
        skey = self._skey(key)
        self._check_open()
        t = self._get(skey)
        return t if device is None or torch.device(device).type == "cpu" else t.to(device)

    def get_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Fill the caller's preallocated ``out`` with the entry under ``key``; return ``out``.

        ``out`` must match the entry's dtype and shape and be contiguous
        (:class:`IncompatibleTensorError` otherwise). Zero-copy where the transport allows.
        """
        skey = self._skey(key)
        self._check_open()
        if not isinstance(out, torch.Tensor) or not out.is_contiguous():
            raise IncompatibleTensorError("get_into needs a contiguous torch.Tensor destination")
        if out.device.type == "cpu" or self.capabilities.zero_copy_device:
            self._get_into(skey, out)
        else:
            self._get_into_via_host(skey, out)
        return out

    def _get_into_via_host(self, skey: str, out: torch.Tensor) -> None:
        """Land an entry in a device tensor through a reused pinned staging buffer."""
        from ectransfer.connector.staging import default_pool, host_view, to_device_async

        pool = default_pool()
        with pool.borrow(out.numel() * out.element_size(), self.config.timeout_s) as buf:
            host = host_view(buf, out, out.dtype)
            self._get_into(skey, host)
            event = to_device_async(host, out)
            if event is not None:
                event.synchronize()  # the buffer goes back to the pool: the copy must be done

    def exists(self, keys: Iterable[str]) -> list[bool]:
        """One bool per key: is an entry stored under it (now)?"""
        skeys = [storage_key(self._namespace, k) for k in validate_keys(keys)]
        self._check_open()
        return self._exists(skeys) if skeys else []

    def delete(self, keys: Iterable[str]) -> None:
        """Remove the entries under ``keys``; keys without an entry are ignored."""
        skeys = [storage_key(self._namespace, k) for k in validate_keys(keys)]
        self._check_open()
        if skeys:
            self._delete(skeys)

    def release(self, keys: Iterable[str]) -> None:
        """Tell the backend this reader is done with ``keys`` (after loading them).

        Stores ignore it: entries stay until deleted, evicted or expired. A peer-to-peer
        backend (``capabilities.peer_to_peer``) lets the writer free its copy; the writer also
        frees it after its lease, so a reader that dies before releasing leaks nothing.
        The connector calls it once an item is loaded.
        """
        skeys = [storage_key(self._namespace, k) for k in validate_keys(keys)]
        self._check_open()
        if skeys:
            self._release(skeys)

    def put_many(self, items: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Store several tensors; like :meth:`put` for each, possibly in parallel or batched."""
        pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        staged = [(self._skey(k), _to_host(t)) for k, t in pairs]
        self._check_open()
        if staged:
            self._put_many(staged)

    def get_many(self, keys: Iterable[str], *, device: torch.device | str | None = None) -> list[torch.Tensor]:
        """Like :meth:`get` for each key; raises on the first missing or corrupt entry."""
        skeys = [storage_key(self._namespace, k) for k in validate_keys(keys)]
        self._check_open()
        out = self._get_many(skeys) if skeys else []
        if device is not None and torch.device(device).type != "cpu":
            out = [t.to(device) for t in out]
        return out

    def get_many_into(self, keys: Sequence[str], outs: Sequence[torch.Tensor]) -> None:
        """Like :meth:`get_into` for each (key, out) pair."""
        skeys = [storage_key(self._namespace, k) for k in validate_keys(keys)]
        if len(skeys) != len(outs):
            raise ValueError(f"{len(skeys)} keys but {len(outs)} destination tensors")
        self._check_open()
        if any(o.device.type != "cpu" for o in outs) and not self.capabilities.zero_copy_device:
            for k, o in zip(skeys, outs):
                if o.device.type == "cpu":
                    self._get_into(k, o)
                else:
                    self._get_into_via_host(k, o)
            return
        for o in outs:
            if not o.is_contiguous():
                raise IncompatibleTensorError("get_many_into needs contiguous destination tensors")
        if skeys:
            self._get_many_into(skeys, list(outs))

    def close(self) -> None:
        """Release the backend's resources. Idempotent; any later call raises BackendClosedError."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self: Any) -> Any:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.describe()} ({state})>"

    def describe(self) -> str:
        """A short, credential-free description (location, namespace) for logs and repr."""
        ns = f" namespace={self._namespace!r}" if self._namespace else ""
        return f"{self.name}{ns}"

    def stats(self) -> dict[str, Any]:
        """Backend-specific readings: cumulative counters or current levels, by name.

        Names are short identifiers (``[a-z0-9_]``), e.g. a tiered backend's ``tier0_hits`` or
        NIXL's ``arena_used_bytes``. The connector exports every numeric value as a gauge,
        ``backend_<name>`` in the logged stats and Prometheus ``vllm:ectransfer_backend{stat=}``;
        other values (strings, lists: diagnostics) are ignored there. Default: none.
        """
        return {}

