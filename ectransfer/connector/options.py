"""Connector options and the backend they open, from one flat mapping.

vLLM users write everything in ``ec_connector_extra_config``::

    {"backend": "redis", "url": "redis://cache:6379/0", "ttl_s": 600, "load_timeout_s": 10}

The keys of :class:`ConnectorOptions` configure the lifecycle (timeouts, bounds, policies);
``backend`` and ``url`` choose the transport; every other key is a backend option, validated by
that backend's typed config when the connector starts, so a misspelt key fails start-up with
an error that names it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from ectransfer.backend import Backend
from ectransfer.config import TypedOptions, redact_url, size
from ectransfer.errors import ConfigError
from ectransfer.registry import backend_class, backend_for_url, open_backend

__all__ = ["ConnectorOptions", "Role", "TransportSpec", "split_options"]


class Role(enum.Enum):
    """What this instance does with encoder caches (vLLM's ``ec_role``)."""

    PRODUCER = "producer"
    CONSUMER = "consumer"
    BOTH = "both"

    @property
    def produces(self) -> bool:
        return self is not Role.CONSUMER

    @property
    def consumes(self) -> bool:
        return self is not Role.PRODUCER


@dataclasses.dataclass(frozen=True)
class ConnectorOptions(TypedOptions):
    """Lifecycle options (see docs/vllm.md for each one).

    lookup_timeout_s: bound on one scheduler-side existence check; a slower answer counts as
        a miss (the item is encoded locally), so a slow store never stalls a scheduler step.
    load_timeout_s: how long a request may wait for its items (fetch and verify, or, for an
        item its producer announced, for the item to appear); past it the item has failed.
    max_inflight_bytes: bytes of saves in flight before ``save`` waits (back-pressure).
    save_wait_s: how long ``save`` may wait for room before the save fails.
    max_staged_bytes: bytes of fetched-and-verified items waiting to be loaded.
    save_threads / load_threads: worker threads for saves and for parallel fetches.
    on_load_failure: ``reencode`` (the request encodes the item itself when its media is
        there; otherwise it fails) or ``fail`` (the request ends with an error).
    skip_existing: a pure producer does not encode an item the store already holds.
    verify_shape: a fetched item must have as many embeddings as the request expects.
    """

    lookup_timeout_s: float = 0.5
    load_timeout_s: float = 30.0
    max_inflight_bytes: int = size(1 << 30)
    save_wait_s: float = 30.0
    max_staged_bytes: int = size(2 << 30)
    save_threads: int = 2
    load_threads: int = 4
    on_load_failure: str = "reencode"
    skip_existing: bool = True
    verify_shape: bool = True

    @classmethod
    def label(cls) -> str:
        return "ec_connector_extra_config"

    def validate(self) -> None:
        for name in ("lookup_timeout_s", "load_timeout_s", "save_wait_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"ec_connector_extra_config: {name!r} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_inflight_bytes", "max_staged_bytes", "save_threads", "load_threads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ec_connector_extra_config: {name!r} must be > 0, got {getattr(self, name)!r}")
        if self.on_load_failure not in ("reencode", "fail"):
            raise ConfigError("ec_connector_extra_config: 'on_load_failure' must be 'reencode' or 'fail', "
                              f"got {self.on_load_failure!r}")


@dataclasses.dataclass(frozen=True)
class TransportSpec:
    """Which backend to open and with what (``url`` may be None when ``backend`` is given)."""

    backend: str | None
    url: str | None
    options: Mapping[str, Any]

    def describe(self) -> str:
        """Backend and URL without credentials (safe to log)."""
        where = redact_url(self.url) if self.url else ""
        return f"backend={self.backend or backend_for_url(self.url or '')} {where}".strip()

    def open(self, role: Role) -> Backend[Any]:
        """Open the backend; a backend that declares a ``role`` option gets ours unless set."""
        opts = dict(self.options)
        name = self.backend
        if name is not None:
            opts["backend"] = name
        cls_name = name if name is not None else backend_for_url(self.url or "")
        if "role" not in opts and "role" in backend_class(cls_name).config_class.option_names():
            opts["role"] = role.value
        try:
            return open_backend(self.url, **opts)
        except ConfigError as exc:
            if "unknown option" not in str(exc):
                raise
            raise ConfigError(f"{exc} (connector options: {', '.join(ConnectorOptions.option_names())})") from None


_TRANSPORT_KEYS = ("backend", "url")


def split_options(extra: Mapping[str, Any] | None) -> tuple[ConnectorOptions, TransportSpec]:
    """Split a flat mapping into the connector's options and the transport to open."""
    if extra is None:
        extra = {}
    if not isinstance(extra, Mapping):
        raise ConfigError(f"ec_connector_extra_config must be a mapping, got {type(extra).__name__}")
    own = set(ConnectorOptions.option_names())
    connector = ConnectorOptions.from_options({k: v for k, v in extra.items() if k in own})
    backend = extra.get("backend")
    url = extra.get("url")
    if backend is None and url is None:
        raise ConfigError("ec_connector_extra_config needs 'url' (e.g. \"file:///mnt/ec\", \"redis://host:6379\") "
                          "or 'backend'")
    for name, value in (("backend", backend), ("url", url)):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"ec_connector_extra_config: {name!r} must be a string, got {type(value).__name__}")
    rest = {k: v for k, v in extra.items() if k not in own and k not in _TRANSPORT_KEYS}
    return connector, TransportSpec(backend, url, rest)
