"""Fault target ``tiered``: a memory read cache in front of a real ``redis-server``.

The stack is ``memory://<name>`` (``write='around'``, ``max_bytes=4MiB``) then Redis, given as
one self-contained ``tiered://?tiers=<JSON>`` URL, so the matrix and the vLLM adapter tests also
exercise the URL form. Puts go to Redis only (a producer never reads its own items back);
reads promote what fits into the memory tier. The memory tier is a named store: every stack
this process opens shares it (the consumer engine and the stack a test corrupts through).
Items over 4 MiB stay in Redis only, so the 8 MiB item of the kill-mid-get cell keeps reaching
the server. Server faults are Redis's: killing the target kills the redis-server.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from ectransfer.backend import Backend
from ectransfer.backends.fs import FsBackend
from ectransfer.backends.memory import MemoryBackend
from tests.faults.target_redis import RedisTarget
from tests.faults.targets import Target


def corrupt_tiers(stack: Backend[Any], key: str, mutate: Callable[[bytes], bytes]) -> None:
    """Rewrite the stored bytes of ``key`` in every tier of ``stack`` that holds it.

    The write-back queue is flushed first, so no valid queued copy is left to serve reads.
    """
    from ectransfer.backends.tiered import TieredBackend

    assert isinstance(stack, TieredBackend)
    stack.flush()
    held = 0
    for tier in stack.tiers:
        if not tier.exists([key])[0]:
            continue
        held += 1
        skey = tier._skey(key)
        if isinstance(tier, MemoryBackend):
            with tier._store.lock:
                tier._store.entries[skey] = mutate(tier._store.entries[skey])
        elif isinstance(tier, FsBackend):
            path = tier.entry_path(skey)
            path.write_bytes(mutate(path.read_bytes()))
        elif tier.name == "redis":
            from ectransfer.testing.servers import redis as servers

            servers.rewrite_entry(tier, key, mutate)
        else:
            pytest.skip(f"corrupt_tiers cannot rewrite entries of a {tier.name} tier")
    assert held, f"no tier holds {key!r}"


def tiered_url(tiers: list[Any]) -> str:
    """A self-contained ``tiered://`` URL (the tier list as percent-encoded JSON)."""
    return "tiered://?tiers=" + quote(json.dumps(tiers), safe="")


class TieredTarget(RedisTarget):
    name = "tiered"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.store = f"faults-tiered-{uuid.uuid4().hex}"

    def _stack(self, redis_url: str, redis_options: dict[str, Any]) -> str:
        return tiered_url([{"url": f"memory://{self.store}", "max_bytes": "4MiB", "write": "around"},
                           {"url": redis_url, **redis_options}])

    def _redis_options(self) -> dict[str, Any]:
        return dict(self.server.options)

    def url(self) -> str:
        return self._stack(self.server.url, self._redis_options())

    def options(self) -> dict[str, Any]:
        return {}

    def corrupt(self, backend: Backend[Any], key: str, mutate: Callable[[bytes], bytes]) -> None:
        corrupt_tiers(backend, key, mutate)

    def unreachable_url(self) -> tuple[str, dict[str, Any]]:
        url, opts = super().unreachable_url()
        return self._stack(url, opts), {}

    def proxied(self, proxy_port_for: Callable[[int], int]) -> tuple[str, dict[str, Any]]:
        port = proxy_port_for(self.ports()[0])
        return self._stack(f"redis://127.0.0.1:{port}/0", self._redis_options()), {}


TARGETS: dict[str, Callable[[Path], Target]] = {"tiered": TieredTarget}
