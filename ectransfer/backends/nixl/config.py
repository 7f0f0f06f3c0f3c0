"""Options of the nixl backend and the parsing of ``nixl://host:port[,host:port...]``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import urlsplit

from ectransfer.config import BackendConfig, size
from ectransfer.errors import ConfigError

__all__ = ["BESIDE_MIN", "ROLES", "NixlConfig", "parse_address", "parse_addresses"]

ROLES = ("auto", "producer", "consumer", "both")
LANDINGS = ("direct", "buffer")
HASH_BESIDE = ("auto", "on", "off")
#: ``hash_beside`` applies to entries of at least this many bytes
BESIDE_MIN = 4 << 20


def parse_address(text: str, *, what: str = "address") -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``; ConfigError naming ``what``."""
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"nixl backend: {what} {text!r} is not host:port (port 1-65535)")
    return host, int(port_text)


def parse_addresses(value: str | tuple[str, ...] | list[str], *, what: str) -> tuple[tuple[str, int], ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(parse_address(a, what=what) for a in items if a.strip())


@dataclasses.dataclass(frozen=True)
class NixlConfig(BackendConfig):
    """Options of the nixl backend (``nixl://enc1:7600,enc2:7600?role=consumer``).

    peers: the producers' control endpoints (``host:port``), from the URL.
    role: ``producer`` serves ``listen`` (default: the first peer); ``consumer`` looks keys up at
        every peer; ``both`` does both; ``auto`` is a consumer that also becomes the producer of
        ``listen`` on its first put (a process that saves serves; one that only reads never binds).
    nixl_backend: the NIXL transport plugin (``UCX``).
    arena_bytes / arena_device: the producer's registered arena (``cpu``, or ``cuda``/``cuda:N``:
        untested here, see docs/backends/nixl.md).
    put_wait_s: how long a put waits for arena space before CapacityError.
    lease_s: a saved item is freed this long after its put unless released earlier.
    landing: ``direct`` READs into the caller's tensor (registered for the call); ``buffer``
        READs into a receive buffer of ``recv_buffer_bytes`` registered once, then copies.
    hash_beside: ``on``: a large entry (``landing="direct"``, 4 MiB or more) is READ in 1 MiB
        pieces, each hashed on a second thread while the next one moves, and a producer hashes
        what it copies into its arena the same way; ``off``: hashing on the calling thread;
        ``auto`` (default): ``on`` where the host has more than two CPUs.
    lookup_timeout_s: bound of one producer's answer to ``exists`` (never blocks a scheduler step
        longer); ``exists_cache_s``: how long answers are reused; ``peer_backoff_s``: how long an
        unreachable producer is skipped by ``exists``.
    """

    backend_name: ClassVar[str] = "nixl"
    peers: tuple[str, ...] = ()
    role: str = "auto"
    listen: str = ""
    nixl_backend: str = "UCX"
    arena_bytes: int = size(1 << 30)
    arena_device: str = "cpu"
    put_wait_s: float = 5.0
    lease_s: float = 120.0
    landing: str = "direct"
    recv_buffer_bytes: int = size(256 << 20)
    hash_beside: str = "auto"
    lookup_timeout_s: float = 0.5
    exists_cache_s: float = 0.25
    peer_backoff_s: float = 1.0

    def validate(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"nixl backend: option 'role' must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.landing not in LANDINGS:
            raise ConfigError(f"nixl backend: option 'landing' must be one of {', '.join(LANDINGS)}, got {self.landing!r}")
        if self.hash_beside not in HASH_BESIDE:
            raise ConfigError(f"nixl backend: option 'hash_beside' must be one of {', '.join(HASH_BESIDE)}, "
                              f"got {self.hash_beside!r}")
        if not self.peers and not self.listen:
            raise ConfigError("nixl backend: no producer address: give nixl://host:port (option 'peers') or 'listen'")
        parse_addresses(self.peers, what="peer address (option 'peers')")
        if self.listen:
            parse_address(self.listen, what="option 'listen'")
        if self.role == "consumer" and not self.peers:
            raise ConfigError("nixl backend: role 'consumer' needs at least one producer address in the URL")
        for name in ("put_wait_s", "exists_cache_s", "peer_backoff_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"nixl backend: option {name!r} must be >= 0, got {getattr(self, name)!r}")
        for name in ("lease_s", "lookup_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"nixl backend: option {name!r} must be > 0, got {getattr(self, name)!r}")
        for name in ("arena_bytes", "recv_buffer_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"nixl backend: option {name!r} must be > 0, got {getattr(self, name)!r}")
        if not (self.arena_device == "cpu" or self.arena_device.startswith("cuda")):
            raise ConfigError(f"nixl backend: option 'arena_device' must be 'cpu' or 'cuda[:N]', got {self.arena_device!r}")
        if not self.nixl_backend:
            raise ConfigError("nixl backend: option 'nixl_backend' must name a NIXL plugin such as 'UCX'")

    @property
    def peer_addresses(self) -> tuple[tuple[str, int], ...]:
        return parse_addresses(self.peers, what="peer address")

    @property
    def listen_address(self) -> tuple[str, int]:
        """Where a producer binds: ``listen`` if given, else the first peer address."""
        if self.listen:
            return parse_address(self.listen, what="option 'listen'")
        return self.peer_addresses[0]

    @property
    def hashes_beside(self) -> bool:
        """``hash_beside`` resolved for this host."""
        return self.hash_beside == "on" or (self.hash_beside == "auto" and (os.cpu_count() or 1) > 2)

    @property
    def serves(self) -> bool:
        return self.role in ("producer", "both")

    @property
    def looks_up(self) -> bool:
        return self.role in ("consumer", "both", "auto")

    @classmethod
    def from_url(cls, url: str | None, options: Mapping[str, Any]) -> NixlConfig:
        fixed: dict[str, Any] = {}
        if url:
            parts = urlsplit(url)
            if parts.scheme.lower() != "nixl":
                raise ConfigError(f"nixl backend: expected a nixl:// URL, got scheme {parts.scheme!r}")
            if parts.path not in ("", "/"):
                raise ConfigError(f"nixl backend: a nixl:// URL names host:port endpoints only, got path {parts.path!r}")
            if "@" in parts.netloc:
                raise ConfigError("nixl backend: nixl:// URLs carry no credentials")
            addresses = tuple(a.strip() for a in parts.netloc.split(",") if a.strip())
            if not addresses:
                raise ConfigError("nixl backend: the URL names no producer (nixl://host:port[,host:port...])")
            for a in addresses:
                parse_address(a, what="URL address")
            fixed["peers"] = addresses
        return cls.from_options(options, **fixed)
