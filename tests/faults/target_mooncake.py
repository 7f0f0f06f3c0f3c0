"""Fault target: the mooncake backend on a real ``mooncake_master`` and a segment holder.

Each target owns its own master and holder (``ectransfer.testing.servers.mooncake.spawn``), so
killing or restarting the master never disturbs another test. The slow-server cell cannot be
expressed with the in-process :class:`~ectransfer.testing.proxy.StallingProxy`: Mooncake's
``setup()`` holds the GIL while it talks to the master, so the proxy's Python threads cannot
forward a single byte of it and every open through the proxy fails. That cell skips with this
reason; ``tests/backends/test_mooncake.py`` freezes the master with SIGSTOP instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ectransfer.backend import Backend
from tests.faults.targets import Target


class MooncakeTarget(Target):
    name = "mooncake"
    has_server = True

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        from ectransfer.backends.mooncake import MooncakeBackend

        ok, why = MooncakeBackend.is_available()
        if not ok:
            pytest.skip(f"mooncake backend not available: {why}")
        from ectransfer.testing.servers import mooncake

        self._servers = mooncake
        self.server = mooncake.spawn(workdir, segment_size=256 << 20)

    def url(self) -> str:
        return self.server.url

    def options(self) -> dict[str, Any]:
        return {**self.server.options, "local_buffer_size": "64MiB"}

    def corrupt(self, backend: Backend[Any], key: str, mutate: Callable[[bytes], bytes]) -> None:
        try:
            self._servers.rewrite_entry(backend, key, mutate)
        except ValueError as exc:
            pytest.skip(str(exc))

    def unreachable_url(self) -> tuple[str, dict[str, Any]]:
        from ectransfer.testing.servers import free_port

        return f"mooncake://127.0.0.1:{free_port()}", self.options()

    def kill_server(self) -> None:
        self.server.master.kill()

    def restart_server(self) -> None:
        self._servers.restart_master(self.server)

    def proxied(self, proxy_port_for: Callable[[int], int]) -> tuple[str, dict[str, Any]]:
        pytest.skip("Mooncake's setup() holds the GIL while it talks to the master, so an in-process TCP proxy "
                    "cannot forward it; the stalled-master case is tests/backends/test_mooncake.py (SIGSTOP)")

    def close(self) -> None:
        self.server.stop()


TARGETS = {"mooncake": MooncakeTarget}
