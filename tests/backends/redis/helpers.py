"""Helpers shared by the Redis backend tests."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from typing import Any

import pytest

from ectransfer.backends.redis import RedisBackend
from ectransfer.backends.redis.layout import Manifest

needs_redis_server = pytest.mark.skipif(shutil.which("redis-server") is None,
                                        reason="redis-server is not installed (Debian: apt-get install redis-server)")

SECRET = "s3cret-pa55-xyzzy"


def chunk_keys(be: RedisBackend, key: str) -> list[str]:
    skey = be._skey(key)
    manifest, _ = Manifest.decode(be.client.get(be.entry_key(skey)), key=skey)
    return be.key_layout.chunks(skey, manifest.version, manifest.chunks)


def all_keys(be: RedisBackend) -> list[bytes]:
    return sorted(be.client.keys("*"))


def in_thread(fn: Callable[[], Any], limit_s: float) -> BaseException | None:
    """Run ``fn``; fail the test if it does not end within ``limit_s`` (a hang); return its error."""
    box: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            box.append(exc)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(limit_s)
    assert not th.is_alive(), f"call still running after {limit_s} s: it hangs"
    return box[0] if box else None
