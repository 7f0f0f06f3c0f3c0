"""Real redis-server fixtures: one standalone server and one 3-node Cluster per test module."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ectransfer import open_backend
from ectransfer.backends.redis import RedisBackend
from ectransfer.testing.servers import SpawnedServer
from ectransfer.testing.servers import redis as servers
from tests.backends.redis.helpers import SECRET


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpawnedServer]:
    with servers.spawn(tmp_path_factory.mktemp("redis")) as s:
        yield s


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpawnedServer]:
    with servers.spawn_cluster(tmp_path_factory.mktemp("redis-cluster")) as s:
        yield s


@pytest.fixture
def store(standalone: SpawnedServer) -> SpawnedServer:
    servers.flush(standalone)
    return standalone


@pytest.fixture
def opener(store: SpawnedServer) -> Iterator[Callable[..., RedisBackend]]:
    opened: list[RedisBackend] = []

    def _open(**opts: Any) -> RedisBackend:
        be = open_backend(store.url, **{**store.options, **opts})
        assert isinstance(be, RedisBackend)
        opened.append(be)
        return be

    yield _open
    for be in opened:
        be.close()


@pytest.fixture(scope="module")
def protected(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpawnedServer]:
    with servers.spawn(tmp_path_factory.mktemp("redis-auth"), password=SECRET) as s:
        yield s
