"""Redis / Valkey backend, standalone or Cluster (``redis://``, ``rediss://``, ``unix://``,
``redis+cluster://``). See :mod:`ectransfer.backends.redis.backend` for the data layout and
``docs/backends/redis.md`` for every option.

Importing this package does not import redis-py; opening a backend does.
"""

from __future__ import annotations

from ectransfer.backends.redis.backend import RedisBackend
from ectransfer.backends.redis.config import RedisConfig

__all__ = ["RedisBackend", "RedisConfig"]
