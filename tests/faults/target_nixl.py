"""Fault target ``nixl``: the "server" is a producer process, the reader a consumer here.

``open()`` gives a :class:`~ectransfer.testing.servers.nixl.PeerPair`: puts go to a producer
child process, gets are NIXL READs into this process. Killing the server SIGKILLs the producer;
restarting starts a fresh one on the same port (its entries are gone: nothing persists).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ectransfer.backend import Backend
from ectransfer.testing.servers import free_port
from tests.faults.targets import Target


class NixlTarget(Target):
    name = "nixl"
    has_server = True
    # Each writer process is its own producer with its own address: several processes cannot
    # write one shared store, so the multi-process writer cell does not apply.
    shared_across_processes = False
    not_shared_reason = "each writer process is its own producer, so several processes cannot write one store"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        from ectransfer.backends.nixl import NixlBackend

        ok, why = NixlBackend.is_available()
        if not ok:
            pytest.skip(f"nixl: {why}")
        from ectransfer.testing.servers.nixl import ProducerFleet

        self.fleet = ProducerFleet(producer_options={"arena_bytes": "128MiB"})

    def url(self) -> str:
        return self.fleet.url()

    def options(self) -> dict[str, Any]:
        return {"role": "consumer", "exists_cache_s": 0.0}

    def open(self, **opts: Any) -> Backend[Any]:
        return self.fleet.open_pair(**opts)

    def corrupt(self, backend: Backend[Any], key: str, mutate: Callable[[bytes], bytes]) -> None:
        from ectransfer.testing.servers.nixl import PeerPair

        assert isinstance(backend, PeerPair)
        skey = backend._skey(key)
        producer = self.fleet.producer(backend.namespace)
        producer.call_backend("store_entry_bytes", skey, mutate(producer.call_backend("entry_bytes", skey)))

    def unreachable_url(self) -> tuple[str, dict[str, Any]]:
        return f"nixl://127.0.0.1:{free_port()}", {"role": "consumer"}

    def kill_server(self) -> None:
        self.fleet.kill("")

    def restart_server(self) -> None:
        self.fleet.restart("")

    def proxied(self, proxy_port_for: Callable[[int], int]) -> tuple[str, dict[str, Any]]:
        pytest.skip("a nixl backend that saves is its own producer, so its reads of its own entries never "
                    "cross the network; a stalled producer is tested in tests/backends/test_nixl.py "
                    "(test_exists_is_cheap_with_a_stalled_producer)")

    def close(self) -> None:
        self.fleet.close()


TARGETS: dict[str, Callable[[Path], Target]] = {"nixl": NixlTarget}
