"""The conformance kit against real redis-server processes, four ways (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ectransfer import open_backend
from ectransfer.backend import Backend
from ectransfer.testing import BackendTests
from ectransfer.testing.servers import SpawnedServer
from ectransfer.testing.servers import redis as servers
from tests.backends.redis.helpers import needs_redis_server

pytestmark = needs_redis_server


class _RedisCorrupt:
    def corrupt(self, backend: Backend[Any], key: str, mutate: Callable[[bytes], bytes]) -> None:
        servers.rewrite_entry(backend, key, mutate)


class TestRedisStandalone(_RedisCorrupt, BackendTests):
    @pytest.fixture
    def backend_factory(self, store: SpawnedServer) -> Callable[..., Backend[Any]]:
        return lambda **opts: open_backend(store.url, **{**store.options, **opts})


class TestRedisChunked(_RedisCorrupt, BackendTests):
    """chunk_bytes at its minimum: every item above 1 KiB is a manifest plus chunks."""

    @pytest.fixture
    def backend_factory(self, store: SpawnedServer) -> Callable[..., Backend[Any]]:
        return lambda **opts: open_backend(store.url, **{**store.options, "chunk_bytes": 1024, **opts})


class TestRedisCluster(_RedisCorrupt, BackendTests):
    @pytest.fixture
    def backend_factory(self, cluster: SpawnedServer) -> Callable[..., Backend[Any]]:
        servers.flush(cluster)
        return lambda **opts: open_backend(cluster.url, **{**cluster.options, "chunk_bytes": 4096, **opts})


@pytest.fixture(scope="module")
def remote_reader(standalone: SpawnedServer) -> Iterator[Any]:
    from ectransfer.testing.remote import RemoteBackend

    r = RemoteBackend.start(standalone.url, timeout_s=60, **{**standalone.options, "chunk_bytes": 2048})
    yield r
    r.close()


class TestRedisReadByAnotherProcess(_RedisCorrupt, BackendTests):
    @pytest.fixture
    def backend_factory(self, store: SpawnedServer) -> Callable[..., Backend[Any]]:
        return lambda **opts: open_backend(store.url, **{**store.options, "chunk_bytes": 2048, **opts})

    @pytest.fixture
    def reader(self, backend: Backend[Any], remote_reader: Any) -> Any:
        return remote_reader
