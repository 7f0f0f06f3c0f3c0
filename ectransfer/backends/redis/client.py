"""redis-py, configured for ectransfer: clients, the few commands the layout needs, error mapping.

This is the only module of the backend that imports redis-py (the optional dependency).

* One client per backend: ``redis.Redis`` over a ``BlockingConnectionPool`` (standalone, TLS,
  Unix socket) or ``redis.cluster.RedisCluster``. ``timeout_s`` is the socket connect timeout,
  the timeout of every socket read and write, and how long a thread waits for a pooled
  connection. redis-py's own retries are off, so a call is bounded by one ``timeout_s``; the
  pool replaces connections that died while idle (a restarted server) when they are checked out.
* Commands are packed by redis-py's pure-Python serializer, which hands large arguments to the
  socket as they are. The default (hiredis) packer copies every value twice, which measured at
  about 0.6x the write throughput on 8 MiB values (docs/backends/redis.md).
* :func:`translate` turns redis-py exceptions into :mod:`ectransfer.errors`; messages name the
  operation and the server (credential-free) and never carry the password.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import redis
import redis.exceptions as rex
from redis.backoff import NoBackoff
from redis.retry import Retry

from ectransfer.backends.redis.config import RedisConfig, parse_hostport
from ectransfer.errors import (
    BackendConnectionError,
    CapacityError,
    ConfigError,
    ECTransferError,
    StorageIOError,
    TransferTimeoutError,
)

__all__ = ["RedisClient", "translate"]

# Compare-and-delete: remove a manifest only if it is still the one this writer installed.
_UNLINK_IF_HEAD = """
if redis.call('GETRANGE', KEYS[1], 0, string.len(ARGV[1]) - 1) == ARGV[1] then
  return redis.call('UNLINK', KEYS[1])
end
return 0
"""


def _python_packer() -> Any:
    """redis-py's pure-Python command serializer (sends big arguments without copying them)."""
    try:
        from redis.connection import Encoder, PythonRespSerializer  # type: ignore[attr-defined]

        return PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)  # type: ignore[no-untyped-call]
    except (ImportError, TypeError):  # another redis-py layout: keep its default packer
        return None


def _lean(base: type[Any]) -> type[Any]:
    class Lean(base):  # type: ignore[misc, valid-type]
        def __init__(self, **kwargs: Any) -> None:
            packer = _python_packer()
            if packer is not None:
                kwargs.setdefault("command_packer", packer)
            super().__init__(**kwargs)

    Lean.__name__ = Lean.__qualname__ = f"Lean{base.__name__}"
    return Lean


_TCP = _lean(redis.Connection)
_SSL = _lean(redis.SSLConnection)
_UNIX = _lean(redis.UnixDomainSocketConnection)


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


@contextlib.contextmanager
def translate(op: str, where: str, config: RedisConfig) -> Iterator[None]:
    """Re-raise redis-py errors of ``op`` against ``where`` as ectransfer errors."""
    try:
        yield
    except ECTransferError:
        raise
    except Exception as exc:  # every failure of the client is translated below
        mapped = _map(exc, op, where, config)
        if mapped is None:
            raise
        # Chain the client's exception for debugging unless it could carry the password.
        cause = None if config.password and config.password in repr(exc) else exc
        raise mapped from cause


def _map(exc: Exception, op: str, where: str, config: RedisConfig) -> Exception | None:
    text = _scrub(str(exc), config.password)
    prefix = f"redis backend: {op} at {where}"
    if isinstance(exc, (rex.AuthenticationError, rex.AuthenticationWrongNumberOfArgsError)):
        return BackendConnectionError(f"{prefix}: authentication failed ({text})")
    if isinstance(exc, rex.NoPermissionError):
        return BackendConnectionError(f"{prefix}: not permitted for this user (ACL): {text}")
    if isinstance(exc, rex.TimeoutError) or (isinstance(exc, rex.ConnectionError)
                                             and "No connection available" in text):
        return TransferTimeoutError(f"{prefix}: no answer within timeout_s={config.timeout_s} ({text})")
    if isinstance(exc, rex.OutOfMemoryError):
        return CapacityError(f"{prefix}: the server is out of memory (maxmemory reached, policy "
                             f"refuses writes): {text}")
    if isinstance(exc, rex.ResponseError) and "DB index is out of range" in text:
        return ConfigError(f"redis backend: option 'db': database {config.db} does not exist at {where}")
    if isinstance(exc, (rex.ConnectionError, rex.ClusterError, rex.RedisClusterException, OSError)):
        return BackendConnectionError(f"{prefix}: {type(exc).__name__}: {text}")
    if isinstance(exc, rex.RedisError):
        return StorageIOError(f"{prefix}: the server refused it: {text}")
    return None


def _tls_kwargs(config: RedisConfig) -> dict[str, Any]:
    return {
        "ssl_ca_certs": config.tls_ca_file,
        "ssl_certfile": config.tls_cert_file,
        "ssl_keyfile": config.tls_key_file,
        "ssl_cert_reqs": "required" if config.tls_verify else "none",
        "ssl_check_hostname": config.tls_verify and config.tls_check_hostname,
    }


class RedisClient:
    """The commands the backend's layout is made of, each bounded and translated."""

    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        self.where = config.location()
        self._pool: Any = None
        with translate("connect", self.where, config):
            self._r: Any = self._cluster(config) if config.cluster else self._standalone(config)
            self._unlink_if_head = self._r.register_script(_UNLINK_IF_HEAD)

    def _common(self, config: RedisConfig) -> dict[str, Any]:
        return {"username": config.username, "password": config.password, "socket_timeout": config.timeout_s,
                "socket_connect_timeout": config.timeout_s, "max_connections": config.max_connections,
                "client_name": "ectransfer"}

    def _standalone(self, config: RedisConfig) -> Any:
        kw = self._common(config)
        kw.update(db=config.db, retry=Retry(NoBackoff(), 0), timeout=config.timeout_s)
        if config.unix_socket is not None:
            kw.update(connection_class=_UNIX, path=config.unix_socket)
        elif config.tls:
            kw.update(connection_class=_SSL, host=config.host, port=config.port, **_tls_kwargs(config))
        else:
            kw.update(connection_class=_TCP, host=config.host, port=config.port)
        self._pool = redis.BlockingConnectionPool(**kw)  # type: ignore[no-untyped-call]
        return redis.Redis(connection_pool=self._pool)

    def _cluster(self, config: RedisConfig) -> Any:
        from redis.cluster import ClusterNode, RedisCluster

        mapping = {parse_hostport(k, what="address_map"): parse_hostport(v, what="address_map")
                   for k, v in config.address_map.items()}
        seeds = config.seed_nodes()
        # After a failed command redis-py refreshes the slot map, asking each seed node in turn
        # with its own socket timeout. Splitting timeout_s between the command and those probes
        # keeps a call against a stalled cluster within timeout_s; the probes ask only the
        # configured seeds (dynamic_startup_nodes=False), so the split is known up front.
        wait_s = config.timeout_s / (1 + len(seeds))
        kw = self._common(config)
        kw.update(socket_timeout=wait_s, socket_connect_timeout=wait_s, timeout=config.timeout_s,
                  connection_class=_SSL if config.tls else _TCP, connection_pool_class=redis.BlockingConnectionPool)
        if config.tls:
            kw.update(_tls_kwargs(config))
        (host, port), *others = seeds
        # RedisCluster honours connection_class (our lean packer) only for nodes built from a
        # URL; the URL names the first seed node and carries nothing else.
        first = f"[{host}]" if ":" in host else host
        return RedisCluster(
            url=f"redis://{first}:{port}",
            startup_nodes=[ClusterNode(h, p) for h, p in others],  # type: ignore[no-untyped-call]
            retry=Retry(NoBackoff(), 0), require_full_coverage=True, dynamic_startup_nodes=False,
            address_remap=(lambda addr: mapping.get(addr, addr)) if mapping else None, **kw,
        )

    # ------------------------------------------------------------------ commands
    def _run(self, op: str) -> contextlib.AbstractContextManager[None]:
        return translate(op, self.where, self.config)

    def ping(self) -> None:
        with self._run("connect"):
            self._r.ping()

    def get(self, key: str) -> bytes | None:
        with self._run("get"):
            value: bytes | None = self._r.get(key)
            return value

    def head(self, key: str, n: int) -> bytes:
        with self._run("get"):
            value: bytes = self._r.getrange(key, 0, n - 1)
            return value

    def swap(self, key: str, value: bytes | memoryview, head_len: int, px: int | None,
             finalize: Sequence[str] = (), finalize_px: int | None = None) -> tuple[bytes, list[int]]:
        """Atomically read the first ``head_len`` bytes of ``key``'s old value and set the new one.

        ``finalize`` keys (this version's chunks) get their final expiry in the same
        transaction: ``finalize_px`` ms, or none at all (PERSIST). Returns the old head and, per
        finalized key, 1 if it still existed.
        """
        with self._run("put"):
            p = self._r.pipeline(transaction=True)
            p.getrange(key, 0, head_len - 1)
            p.set(key, value, px=px)
            for k in finalize:
                if finalize_px is None:
                    p.persist(k)
                else:
                    p.pexpire(k, finalize_px)
            res = p.execute()
        return res[0], [int(bool(x)) for x in res[2:]]

    def set_each(self, items: Sequence[tuple[str, bytes]], px: int | None) -> list[bytes | None]:
        """``SET key value [PX px] GET`` for each item in one pipeline; the values they replaced."""
        with self._run("put"):
            p = self._r.pipeline(transaction=False)
            for k, v in items:
                p.set(k, v, px=px, get=True)
            return list(p.execute())

    def get_each(self, keys: Sequence[str]) -> list[bytes | None]:
        with self._run("get"):
            p = self._r.pipeline(transaction=False)
            for k in keys:
                p.get(k)
            return list(p.execute())

    def strlen_each(self, keys: Sequence[str]) -> list[int]:
        with self._run("get"):
            p = self._r.pipeline(transaction=False)
            for k in keys:
                p.strlen(k)
            return [int(n) for n in p.execute()]

    def set_chunk(self, key: str, value: memoryview, px: int) -> None:
        with self._run("put"):
            self._r.set(key, value, px=px)

    def take(self, key: str, head_len: int) -> bytes:
        """Atomically read the first ``head_len`` bytes of ``key`` and remove it."""
        with self._run("delete"):
            p = self._r.pipeline(transaction=True)
            p.getrange(key, 0, head_len - 1)
            p.unlink(key)
            head: bytes = p.execute()[0]
            return head

    def unlink_if_head(self, key: str, head: bytes) -> None:
        with self._run("delete"):
            self._unlink_if_head(keys=[key], args=[head])

    def exists_each(self, keys: Sequence[str]) -> list[bool]:
        """One EXISTS per key in one pipeline (keys may live in different cluster slots)."""
        with self._run("exists"):
            p = self._r.pipeline(transaction=False)
            for k in keys:
                p.exists(k)
            return [bool(x) for x in p.execute()]

    def unlink(self, keys: Sequence[str]) -> None:
        if keys:
            with self._run("delete"):
                self._r.unlink(*keys)

    def pexpire(self, keys: Sequence[str], ms: int) -> None:
        if keys:
            with self._run("delete"):
                p = self._r.pipeline(transaction=False)
                for k in keys:
                    p.pexpire(k, ms)
                p.execute()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._r.close()
        if self._pool is not None:
            with contextlib.suppress(Exception):
                self._pool.disconnect()

    @property
    def raw(self) -> Any:
        """The underlying redis-py client (tests and tools)."""
        return self._r
