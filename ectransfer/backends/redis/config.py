"""Options of the Redis backend and the URLs that set them.

URL forms (query parameters are options too)::

    redis://[user[:password]@]host[:port][/db]        plain TCP (port 6379, db 0 by default)
    rediss://[user[:password]@]host[:port][/db]       TLS (tls_ca_file, tls_cert_file, tls_key_file)
    unix://[user[:password]@]/path/to/redis.sock?db=N a Unix socket
    redis+cluster://host:port[,host:port...]          Redis Cluster: seed nodes (or cluster=true)
    rediss+cluster://host:port[,host:port...]         Redis Cluster over TLS

No redis-py import here: the config is built and validated without the optional dependency.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import unquote

from ectransfer.config import BackendConfig, redact_url, secret, size
from ectransfer.errors import ConfigError

__all__ = ["MAX_CHUNK_BYTES", "MIN_CHUNK_BYTES", "RedisConfig", "parse_hostport", "parse_url"]

#: Redis refuses values above ``proto-max-bulk-len`` (512 MiB by default)
MAX_CHUNK_BYTES = 512 << 20
MIN_CHUNK_BYTES = 1 << 10
_PREFIX_RE = re.compile(r"[A-Za-z0-9._:-]{0,64}")
_SCHEMES = {"redis": (False, False), "rediss": (True, False), "redis+cluster": (False, True),
            "rediss+cluster": (True, True), "unix": (False, False)}


def parse_hostport(text: str, *, what: str, default_port: int = 6379) -> tuple[str, int]:
    """``host[:port]`` or ``[v6addr][:port]`` -> ``(host, port)``; ConfigError naming ``what``."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"redis backend: {what}: malformed address {text!r}")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ConfigError(f"redis backend: {what}: missing host in {text!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"redis backend: {what}: invalid port {port_text!r} (expected 1-65535)")
    return host, int(port_text)


def parse_url(url: str) -> dict[str, Any]:
    """The options a Redis URL fixes (host, port, db, credentials, tls, cluster, socket)."""
    shown = redact_url(url)
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _SCHEMES:
        raise ConfigError(f"redis backend: unsupported URL {shown!r}; expected one of "
                          f"{', '.join(s + '://' for s in _SCHEMES)}")
    tls, cluster = _SCHEMES[scheme]
    netloc, slash, path = rest.partition("/")
    fixed: dict[str, Any] = {}
    if tls:
        fixed["tls"] = True
    if cluster:
        fixed["cluster"] = True
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, colon, password = userinfo.partition(":")
        if user:
            fixed["username"] = unquote(user)
        if colon:
            fixed["password"] = unquote(password)
    if scheme == "unix":
        if netloc:
            raise ConfigError(f"redis backend: unix:// URLs name a socket path (unix:///path), got host in {shown!r}")
        if not path:
            raise ConfigError(f"redis backend: {shown!r} names no socket path")
        fixed["unix_socket"] = unquote(slash + path)
        return fixed
    if not netloc:
        raise ConfigError(f"redis backend: {shown!r} names no host")
    nodes = [parse_hostport(n, what=f"URL {shown!r}") for n in netloc.split(",")]
    if len(nodes) > 1 and not cluster:
        raise ConfigError(f"redis backend: several hosts in {shown!r}: use redis+cluster:// for a cluster")
    fixed["host"], fixed["port"] = nodes[0]
    if len(nodes) > 1:
        fixed["cluster_nodes"] = tuple(f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in nodes[1:])
    if path.strip("/"):
        db = path.strip("/")
        if not db.isdigit():
            raise ConfigError(f"redis backend: option 'db': the URL path must be a database number, got {db!r}")
        fixed["db"] = int(db)
    return fixed


@dataclasses.dataclass(frozen=True)
class RedisConfig(BackendConfig):
    """Options of the Redis backend; see ``docs/backends/redis.md`` for each one.

    ``timeout_s`` (inherited) bounds connecting, every command and waiting for a pooled
    connection. ``password`` is a secret: never in ``repr``, logs or error messages.
    """

    backend_name: ClassVar[str] = "redis"
    host: str = "localhost"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = secret(None)
    unix_socket: str | None = None
    cluster: bool = False
    cluster_nodes: tuple[str, ...] = ()
    address_map: dict[str, str] = dataclasses.field(default_factory=dict)
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_verify: bool = True
    tls_check_hostname: bool = True  # only with tls_verify: an unverified peer has no name to check
    chunk_bytes: int = size(64 << 20)
    ttl_s: float | None = None
    key_prefix: str = "ectransfer"
    max_connections: int = 32

    def validate(self) -> None:
        self._validate_location()
        self._validate_tls()
        if not MIN_CHUNK_BYTES <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ConfigError(f"redis backend: option 'chunk_bytes' must be between {MIN_CHUNK_BYTES} and "
                              f"{MAX_CHUNK_BYTES} (Redis proto-max-bulk-len), got {self.chunk_bytes}")
        if self.ttl_s is not None and not self.ttl_s >= 0.001:
            raise ConfigError(f"redis backend: option 'ttl_s' must be >= 0.001 (milliseconds), got {self.ttl_s}")
        if not _PREFIX_RE.fullmatch(self.key_prefix):
            raise ConfigError("redis backend: option 'key_prefix' must be at most 64 characters from "
                              f"[A-Za-z0-9._:-], got {self.key_prefix!r}")
        if self.max_connections < 1:
            raise ConfigError(f"redis backend: option 'max_connections' must be >= 1, got {self.max_connections}")

    def _validate_location(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"redis backend: option 'port' must be 1-65535, got {self.port}")
        if self.db < 0:
            raise ConfigError(f"redis backend: option 'db' must be >= 0, got {self.db}")
        if self.unix_socket is not None:
            if self.cluster or self.tls:
                raise ConfigError("redis backend: option 'unix_socket' cannot be combined with cluster or tls")
            if not self.unix_socket.startswith("/"):
                raise ConfigError(f"redis backend: option 'unix_socket' must be an absolute path, got {self.unix_socket!r}")
        elif not self.host:
            raise ConfigError("redis backend: option 'host' (or a redis:// URL) is required")
        for node in self.cluster_nodes:
            parse_hostport(node, what="option 'cluster_nodes'")
        for src, dst in self.address_map.items():
            parse_hostport(str(src), what="option 'address_map'")
            parse_hostport(str(dst), what="option 'address_map'")
        if not self.cluster:
            for name in ("cluster_nodes", "address_map"):
                if getattr(self, name):
                    raise ConfigError(f"redis backend: option {name!r} applies to Redis Cluster only "
                                      "(redis+cluster:// or cluster=true)")
        elif self.db != 0:
            raise ConfigError(f"redis backend: option 'db': Redis Cluster has only database 0, got {self.db}")

    def _validate_tls(self) -> None:
        files = {"tls_ca_file": self.tls_ca_file, "tls_cert_file": self.tls_cert_file,
                 "tls_key_file": self.tls_key_file}
        given = [name for name, value in files.items() if value is not None]
        if not self.tls:
            if given:
                raise ConfigError(f"redis backend: option {given[0]!r} needs TLS (a rediss:// URL or tls=true)")
            return
        for name in given:
            if not os.path.isfile(str(files[name])):
                raise ConfigError(f"redis backend: option {name!r}: no such file {files[name]!r}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("redis backend: options 'tls_cert_file' and 'tls_key_file' go together "
                              "(a client certificate needs its key)")

    @classmethod
    def from_url(cls, url: str | None, options: Mapping[str, Any]) -> RedisConfig:
        return cls.from_options(options, **(parse_url(url) if url else {}))

    def seed_nodes(self) -> list[tuple[str, int]]:
        """Every ``(host, port)`` given: the first node, then ``cluster_nodes``."""
        return [(self.host, self.port)] + [parse_hostport(n, what="option 'cluster_nodes'") for n in self.cluster_nodes]

    def location(self) -> str:
        """A credential-free URL naming the server (for messages, logs and ``repr``)."""
        if self.unix_socket is not None:
            return f"unix://{self.unix_socket}?db={self.db}"
        scheme = ("rediss" if self.tls else "redis") + ("+cluster" if self.cluster else "")
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.seed_nodes())
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{hosts}" + ("" if self.cluster else f"/{self.db}")
