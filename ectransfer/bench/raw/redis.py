"""Baseline for the Redis backend: plain redis-py, one SET / one GET per value.

The client is built the way a user of redis-py would build it (``redis.Redis`` with its
defaults, hiredis included when installed), from the same URL and options the backend was
opened with; nothing of ectransfer sits in the data path.
"""

from __future__ import annotations

from typing import Any

from ectransfer.backends.redis.config import RedisConfig
from ectransfer.bench.raw import RawClient

__all__ = ["Raw"]


class Raw(RawClient):
    def __init__(self, url: str, options: dict[str, Any]) -> None:
        super().__init__(url, options)
        import redis
        from redis.cluster import ClusterNode, RedisCluster

        # Only the connection settings matter here; data-path options are the backend's.
        cfg = RedisConfig.from_url(url, {k: v for k, v in options.items()
                                         if k not in ("chunk_bytes", "ttl_s", "key_prefix", "namespace")})
        common: dict[str, Any] = {"username": cfg.username, "password": cfg.password,
                                  "socket_timeout": cfg.timeout_s, "socket_connect_timeout": cfg.timeout_s}
        if cfg.tls:
            common.update(ssl=True, ssl_ca_certs=cfg.tls_ca_file, ssl_certfile=cfg.tls_cert_file,
                          ssl_keyfile=cfg.tls_key_file, ssl_cert_reqs="required" if cfg.tls_verify else "none",
                          ssl_check_hostname=cfg.tls_verify and cfg.tls_check_hostname)
        self._r: Any
        if cfg.cluster:
            self._r = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in cfg.seed_nodes()],  # type: ignore[no-untyped-call]
                                   **common)
        elif cfg.unix_socket is not None:
            self._r = redis.Redis(unix_socket_path=cfg.unix_socket, db=cfg.db, **common)
        else:
            self._r = redis.Redis(host=cfg.host, port=cfg.port, db=cfg.db, **common)

    def _key(self, name: str) -> str:
        return f"ectransfer-raw:{{{name}}}"

    def write(self, name: str, data: memoryview) -> None:
        self._r.set(self._key(name), data)

    def read_into(self, name: str, out: memoryview) -> None:
        value = self._r.get(self._key(name))
        if value is None or len(value) != len(out):
            raise KeyError(f"raw redis: {name!r} is missing or has {0 if value is None else len(value)} bytes, "
                           f"expected {len(out)}")
        out[:] = value

    def delete(self, name: str) -> None:
        self._r.delete(self._key(name))

    def close(self) -> None:
        self._r.close()
