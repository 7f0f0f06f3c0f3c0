"""Options of the Mooncake backend and the URL that sets the master address.

URL: ``mooncake://master-host[:port]`` (port 50051, Mooncake's default, when left out); query
parameters are options too (``mooncake://10.0.0.5:50051?protocol=rdma&device_name=mlx5_0``).
Sizes accept ``"256MiB"``. No Mooncake import here: the config is validated without it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import urlsplit

from ectransfer.config import BackendConfig, redact_url, size
from ectransfer.errors import ConfigError

__all__ = ["DEFAULT_MASTER_PORT", "HEADER_ALLOWANCE", "MooncakeConfig", "parse_url"]

DEFAULT_MASTER_PORT = 50051
#: room for the codec header on top of an item's payload (a header is a few hundred bytes)
HEADER_ALLOWANCE = 64 << 10
MIN_SEGMENT = 1 << 10  # Mooncake refuses smaller segments (MIN_SEGMENT_SIZE)
MAX_SEGMENT = 1 << 40  # ... and larger ones (MAX_SEGMENT_SIZE)
_HOST_RE = re.compile(r"[A-Za-z0-9._-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")
_DEVICES_RE = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")
_PREFIX_RE = re.compile(r"[A-Za-z0-9._:/-]{0,64}")
_METADATA_SCHEMES = ("http://", "https://", "etcd://")


def parse_url(url: str) -> dict[str, Any]:
    """The options a ``mooncake://host[:port]`` URL fixes (``master``)."""
    shown = redact_url(url)
    parts = urlsplit(url)
    if parts.scheme.lower() != "mooncake":
        raise ConfigError(f"mooncake backend: expected a mooncake://host:port URL, got {shown!r}")
    if parts.path not in ("", "/") or parts.fragment or "@" in parts.netloc:
        raise ConfigError(f"mooncake backend: a mooncake:// URL names only the master's host:port, got {shown!r}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ConfigError(f"mooncake backend: invalid port in {shown!r} (expected 1-65535)") from None
    if not host:
        raise ConfigError(f"mooncake backend: the URL {shown!r} names no master host")
    if ":" in host:
        host = f"[{host}]"
    return {"master": f"{host}:{port or DEFAULT_MASTER_PORT}"}


@dataclasses.dataclass(frozen=True)
class MooncakeConfig(BackendConfig):
    """Options of the mooncake backend (every one is described in docs/backends/mooncake.md).

    master: ``host:port`` of ``mooncake_master`` (from the URL).
    metadata_server: ``P2PHANDSHAKE`` (no metadata service: peers exchange it directly), or
        the master's HTTP metadata server ``http://host:port/metadata``, or ``etcd://host:port``.
    protocol: ``tcp`` or ``rdma``; device_name: RDMA device(s), comma separated (rdma only;
        empty lets Mooncake pick).
    local_hostname: the address other Mooncake processes reach this one at; empty picks the
        local address of the route to the master (``127.0.0.1`` for a master on loopback).
    global_segment_size: memory this process contributes to the store (0: none, a client).
    local_buffer_size: the registered staging buffer every item crosses; bounds the largest
        item and the bytes in flight at once.
    max_item_size: if given, the largest item this deployment stores; checked against
        local_buffer_size when the backend opens.
    replica_num: copies of each entry (on distinct segments).
    key_prefix: prepended to every Mooncake key, so entries never collide with other users
        of the same master (LMCache, vLLM's KV connector, ...).
    io_threads: worker threads running Mooncake calls (each call is bounded by timeout_s).
    """

    backend_name: ClassVar[str] = "mooncake"
    master: str = ""
    metadata_server: str = "P2PHANDSHAKE"
    protocol: str = "tcp"
    device_name: str = ""
    local_hostname: str = ""
    global_segment_size: int = size(0)
    local_buffer_size: int = size(256 << 20)
    max_item_size: int | None = size(None)
    replica_num: int = 1
    key_prefix: str = "ectransfer/"
    io_threads: int = 4

    def validate(self) -> None:
        if not self.master:
            raise ConfigError("mooncake backend: the master address is required (mooncake://host:port)")
        host, sep, port = self.master.rpartition(":")
        if not sep or not _HOST_RE.fullmatch(host) or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"mooncake backend: option 'master' must be host:port, got {self.master!r}")
        meta = self.metadata_server
        if meta != "P2PHANDSHAKE" and not (meta.startswith(_METADATA_SCHEMES) and len(meta) > 8):
            raise ConfigError(
                f"mooncake backend: option 'metadata_server' must be 'P2PHANDSHAKE', an http(s)://host:port/metadata "
                f"URL or etcd://host:port, got {redact_url(meta)!r}"
            )
        if self.protocol not in ("tcp", "rdma"):
            raise ConfigError(f"mooncake backend: option 'protocol' must be 'tcp' or 'rdma', got {self.protocol!r}")
        if self.device_name:
            if self.protocol != "rdma":
                raise ConfigError("mooncake backend: option 'device_name' names RDMA devices; it needs protocol='rdma'")
            if not _DEVICES_RE.fullmatch(self.device_name):
                raise ConfigError(f"mooncake backend: option 'device_name' must be a comma-separated list of device "
                                  f"names such as 'mlx5_0,mlx5_1', got {self.device_name!r}")
        if self.local_hostname and not _HOST_RE.fullmatch(self.local_hostname):
            raise ConfigError(f"mooncake backend: option 'local_hostname' must be a host name or IP address, "
                              f"got {self.local_hostname!r}")
        seg = self.global_segment_size
        if seg and not MIN_SEGMENT <= seg <= MAX_SEGMENT:
            raise ConfigError(f"mooncake backend: option 'global_segment_size' must be 0 (contribute no memory) or "
                              f"between 1 KiB and 1 TiB, got {seg}")
        if self.local_buffer_size <= 0:
            raise ConfigError(f"mooncake backend: option 'local_buffer_size' must be > 0, got {self.local_buffer_size}")
        if self.max_item_size is not None:
            if self.max_item_size <= 0:
                raise ConfigError(f"mooncake backend: option 'max_item_size' must be > 0, got {self.max_item_size}")
            if self.max_item_size + HEADER_ALLOWANCE > self.local_buffer_size:
                raise ConfigError(
                    f"mooncake backend: option 'local_buffer_size' ({self.local_buffer_size} bytes) must hold the "
                    f"largest item plus its header: raise it to at least {self.max_item_size + HEADER_ALLOWANCE} "
                    f"bytes for max_item_size={self.max_item_size}"
                )
        if not 1 <= self.replica_num <= 16:
            raise ConfigError(f"mooncake backend: option 'replica_num' must be between 1 and 16, got {self.replica_num}")
        if not _PREFIX_RE.fullmatch(self.key_prefix):
            raise ConfigError(f"mooncake backend: option 'key_prefix' must be up to 64 characters of "
                              f"[A-Za-z0-9._:/-], got {self.key_prefix!r}")
        if not 1 <= self.io_threads <= 256:
            raise ConfigError(f"mooncake backend: option 'io_threads' must be between 1 and 256, got {self.io_threads}")

    @classmethod
    def from_url(cls, url: str | None, options: Mapping[str, Any]) -> MooncakeConfig:
        fixed = parse_url(url) if url else {}
        return cls.from_options(options, **fixed)
