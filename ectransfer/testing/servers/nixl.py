"""NIXL on loopback for tests and ``ectransfer-bench``: no server, producers are processes we own.

NIXL has no server: a producer process serves its own entries. So

* :func:`spawn` only picks a free loopback port and returns ``nixl://127.0.0.1:<port>`` with
  options every process can share; the process that opens it with ``role="producer"`` (the vLLM
  encoder worker) binds the port, the ones with ``role="consumer"`` connect to it.
* :func:`start_producer` starts a producer *process* for a URL (a
  :class:`~ectransfer.testing.remote.RemoteBackend`, so this process can feed it entries).
* :class:`PeerPair` is one :class:`~ectransfer.backend.Backend` made of a writer (a producer,
  usually in another process) and a consumer here: ``put`` lands in the producer's arena,
  ``get`` is a real NIXL READ into this process. It is what the conformance kit, the fault
  matrix and the bench's save/load loop drive (:func:`open_peer_pair`).
* :class:`ProducerFleet` keeps producer processes (one per namespace) alive across tests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ectransfer.backend import Backend
from ectransfer.backends.nixl import NixlBackend, NixlConfig
from ectransfer.errors import BackendConnectionError, ConfigError
from ectransfer.keys import validate_namespace
from ectransfer.registry import open_backend
from ectransfer.testing.remote import RemoteBackend
from ectransfer.testing.servers import SpawnedServer, free_port

__all__ = ["SPAWN_OPTIONS", "PeerPair", "ProducerFleet", "open_peer_pair", "spawn", "start_producer"]

#: options of a spawned loopback deployment; every process (producer or consumer) can use them.
#: exists() answers are not cached, so a test sees a save as soon as put() returns.
SPAWN_OPTIONS: dict[str, Any] = {"arena_bytes": "512MiB", "lease_s": 60.0, "exists_cache_s": 0.0}


def spawn(workdir: Path) -> SpawnedServer:
    """A producer address on a free loopback port; the producer process binds it when it opens."""
    del workdir  # nothing to keep on disk
    return SpawnedServer(url=f"nixl://127.0.0.1:{free_port()}", options=dict(SPAWN_OPTIONS), processes=[])


def start_producer(url: str, *, namespace: str = "", timeout_s: float = 60.0, **options: Any) -> RemoteBackend:
    """A producer process serving the first address of ``url`` (stop it with ``close()``)."""
    return RemoteBackend.start(url, namespace=namespace, timeout_s=timeout_s, **{**options, "role": "producer"})


class PeerPair(Backend[NixlConfig]):
    """Writes go to a producer (``writer()``), reads are NIXL pulls by ``reader`` in this process.

    ``writer`` is called for every write, so a restarted producer takes over. Closing the pair
    closes what it owns (``owns_reader``, and the ``on_close`` callbacks).
    """

    name = "nixl"
    config_class = NixlConfig
    capabilities = NixlBackend.capabilities

    def __init__(self, writer: Callable[[], Backend[Any]], reader: NixlBackend, *, owns_reader: bool = True,
                 on_close: list[Callable[[], None]] | None = None) -> None:
        super().__init__(reader.config)
        self._writer = writer
        self.reader = reader
        self._owns_reader = owns_reader
        self._on_close = list(on_close or [])

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        return NixlBackend.is_available()

    @property
    def writer(self) -> Backend[Any]:
        return self._writer()

    def _put(self, skey: str, tensor: torch.Tensor) -> None:
        self._writer()._put(skey, tensor)

    def _get(self, skey: str) -> torch.Tensor:
        return self.reader._get(skey)

    def _get_into(self, skey: str, out: torch.Tensor) -> None:
        self.reader._get_into(skey, out)

    def _get_many(self, skeys: list[str]) -> list[torch.Tensor]:
        return self.reader._get_many(skeys)

    def _get_many_into(self, skeys: list[str], outs: list[torch.Tensor]) -> None:
        self.reader._get_many_into(skeys, outs)

    def _exists(self, skeys: list[str]) -> list[bool]:
        return self.reader._exists(skeys)

    def _delete(self, skeys: list[str]) -> None:
        self.reader._delete(skeys)  # through the control protocol, as a consumer would

    def _release(self, skeys: list[str]) -> None:
        self.reader._release(skeys)

    def _close(self) -> None:
        try:
            if self._owns_reader:
                self.reader.close()
        finally:
            for fn in self._on_close:
                fn()

    def describe(self) -> str:
        return f"nixl pair (producer {self._writer().describe()}, consumer {self.reader.describe()})"


def _consumer(url: str, namespace: str, options: dict[str, Any]) -> NixlBackend:
    be = open_backend(url, **{**options, "namespace": namespace, "role": "consumer"})
    assert isinstance(be, NixlBackend)
    return be


def open_peer_pair(url: str, options: dict[str, Any] | None = None, *, namespace: str = "") -> PeerPair:
    """A producer process on ``url``'s first address and a consumer here, as one backend.

    For ``ectransfer-bench``: ``open_peer_pair(spawned.url, spawned.options)``. Saves cross a
    pipe to the producer process (they measure that pipe, not NIXL); loads are NIXL READs.
    Closing the pair stops the producer.
    """
    options = dict(options or {})
    producer = start_producer(url, namespace=namespace, **options)
    try:
        reader = _consumer(url, namespace, options)
    except BaseException:
        producer.close()
        raise
    return PeerPair(lambda: producer, reader, on_close=[producer.close])


class ProducerFleet:
    """Producer processes on free loopback ports, one per namespace, started on first use.

    Consumers opened by :meth:`open_pair` look up at every producer started so far, so a
    namespace's reader also asks the other namespaces' producers (and must find nothing there).
    """

    def __init__(self, producer_options: dict[str, Any] | None = None,
                 consumer_options: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> None:
        self.producer_options = dict(producer_options or {})
        self.consumer_options = {"exists_cache_s": 0.0, **(consumer_options or {})}
        self.env = dict(env or {})
        self._ports: dict[str, int] = {}
        self._producers: dict[str, RemoteBackend] = {}
        self._consumers: dict[tuple[str, tuple[tuple[str, Any], ...]], NixlBackend] = {}

    def port(self, namespace: str = "") -> int:
        self.producer(namespace)
        return self._ports[namespace]

    def producer(self, namespace: str = "") -> RemoteBackend:
        namespace = validate_namespace(namespace)
        live = self._producers.get(namespace)
        if live is not None and live.proc.poll() is None:
            return live
        if live is not None:
            raise BackendConnectionError(f"the nixl producer of namespace {namespace!r} is not running")
        for attempt in (0, 1):  # a free port can be taken between choosing and binding it
            port = free_port()
            try:
                live = self._start(namespace, port)
                break
            except BackendConnectionError:
                if attempt:
                    raise
        assert live is not None
        self._ports[namespace] = port
        self._producers[namespace] = live
        return live

    def _start(self, namespace: str, port: int) -> RemoteBackend:
        return RemoteBackend.start(f"nixl://127.0.0.1:{port}", namespace=namespace, timeout_s=60, env=self.env,
                                   **{**self.producer_options, "role": "producer"})

    def url(self) -> str:
        if not self._ports:
            self.producer("")
        return "nixl://" + ",".join(f"127.0.0.1:{p}" for p in self._ports.values())

    def consumer(self, namespace: str = "", **options: Any) -> NixlBackend:
        """A consumer (cached per namespace and options) over every producer started so far."""
        namespace = validate_namespace(namespace)
        self.producer(namespace)
        opts = {**self.consumer_options, **options}
        key = (namespace, tuple(sorted(opts.items())))
        be = self._consumers.get(key)
        if be is None or be.closed:
            be = self._consumers[key] = _consumer(self.url(), namespace, opts)
        return be

    def open_pair(self, namespace: str = "", **options: Any) -> PeerPair:
        """A backend writing to this namespace's producer and reading through a consumer here."""
        reader = self.consumer(namespace, **options)
        return PeerPair(lambda: self.producer(namespace), reader, owns_reader=False)

    def kill(self, namespace: str = "") -> None:
        """SIGKILL the namespace's producer (a crash)."""
        p = self._producers[namespace]
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(timeout=30)

    def restart(self, namespace: str = "") -> None:
        """Start the namespace's producer again on its port (after :meth:`kill`)."""
        old = self._producers.pop(namespace)
        old.close()
        self._producers[namespace] = self._start(namespace, self._ports[namespace])

    def call(self, namespace: str, method: str, *args: Any) -> Any:
        """Call ``method`` of the namespace's producer backend (``stats``, ``arena_used_bytes``...)."""
        return self.producer(namespace).call_backend(method, *args)

    def clear(self) -> None:
        """Every live producer drops its entries (tests start from an empty store)."""
        for ns, p in self._producers.items():
            if p.proc.poll() is None:
                p.call_backend("clear")
            else:
                raise ConfigError(f"the nixl producer of namespace {ns!r} died; restart it")

    def close(self) -> None:
        for c in self._consumers.values():
            c.close()
        self._consumers.clear()
        for p in self._producers.values():
            p.close()
        self._producers.clear()
