"""Fault targets ``redis`` and ``redis-cluster``: real ``redis-server`` processes on loopback.

The standalone target is one server; the cluster target is three masters joined by
``redis-cli --cluster create``. Killing a target kills every process it owns; restarting starts
them again on the same ports (no data is kept: ``--save ''``). For the slow-server fault the
cluster's traffic goes through one proxy per node: the client learns the nodes' real addresses
from the cluster and maps them to the proxies with the backend's ``address_map`` option.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ectransfer.backend import Backend
from ectransfer.testing.servers import SpawnedServer, free_port
from tests.faults.targets import Target


class RedisTarget(Target):
    name = "redis"
    has_server = True

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        pytest.importorskip("redis", reason="the redis targets need redis-py: pip install 'ectransfer[redis]'")
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
        from ectransfer.testing.servers import redis as servers

        self._servers = servers
        self.server = self._spawn(workdir)

    def _spawn(self, workdir: Path) -> SpawnedServer:
        return self._servers.spawn(workdir / "redis")

    def ports(self) -> list[int]:
        return [self._servers.port_of(p) for p in self.server.processes]

    def url(self) -> str:
        return self.server.url

    def options(self) -> dict[str, Any]:
        return dict(self.server.options)

    def corrupt(self, backend: Backend[Any], key: str, mutate: Callable[[bytes], bytes]) -> None:
        self._servers.rewrite_entry(backend, key, mutate)

    def unreachable_url(self) -> tuple[str, dict[str, Any]]:
        return f"redis://127.0.0.1:{free_port()}/0", {}

    def kill_server(self) -> None:
        for p in self.server.processes:
            p.kill()

    def restart_server(self) -> None:
        self._servers.restart(self.server)

    def proxied(self, proxy_port_for: Callable[[int], int]) -> tuple[str, dict[str, Any]]:
        return f"redis://127.0.0.1:{proxy_port_for(self.ports()[0])}/0", self.options()

    def close(self) -> None:
        self.server.stop()


class RedisClusterTarget(RedisTarget):
    name = "redis-cluster"

    def _spawn(self, workdir: Path) -> SpawnedServer:
        return self._servers.spawn_cluster(workdir / "redis-cluster")

    def unreachable_url(self) -> tuple[str, dict[str, Any]]:
        return f"redis+cluster://127.0.0.1:{free_port()}", {}

    def proxied(self, proxy_port_for: Callable[[int], int]) -> tuple[str, dict[str, Any]]:
        mapping = {f"127.0.0.1:{port}": f"127.0.0.1:{proxy_port_for(port)}" for port in self.ports()}
        seeds = ",".join(mapping.values())
        return f"redis+cluster://{seeds}", {**self.options(), "address_map": mapping}


TARGETS: dict[str, Callable[[Path], Target]] = {"redis": RedisTarget, "redis-cluster": RedisClusterTarget}
