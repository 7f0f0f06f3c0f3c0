"""Helpers shared by the Redis backend tests."""

from __future__ import annotations

import shutil

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


