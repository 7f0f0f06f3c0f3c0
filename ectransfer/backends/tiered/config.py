"""The tiered backend's configuration: the stack's options and one validated spec per tier.

``tiers`` is a list, fastest tier first. Each tier is a URL string or a mapping::

    {"url": "memory://", "max_bytes": "2GiB"}                  # options of the tier's backend
    {"url": "redis://cache:6379/0", "write": "back"}
    {"backend": "fs", "root": "/dev/shm/ec", "promote": false}

The keys ``url``, ``backend``, ``write`` and ``promote`` belong to the stack; every other key
is an option of the tier's own backend, validated by that backend's typed config when the
stack's config is built, so a bad tier fails up front with an error naming its index and the
key. The list may also arrive as a JSON string (a URL query, an option string).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, ClassVar

from ectransfer.backend import Backend, Capabilities
from ectransfer.config import BackendConfig, redact_url, size, split_query
from ectransfer.errors import BackendUnavailableError, ConfigError, ECTransferError

__all__ = ["WRITE_POLICIES", "TierSpec", "TieredConfig", "derive_capabilities", "in_tier", "parse_tiers", "relabel"]

#: ``through``: a put returns after this tier has the item. ``back``: a background writer copies
#: it down after the put returned. ``around``: puts skip the tier (and drop what it held for the
#: key); it is filled by promotion only: a read cache.
WRITE_POLICIES = ("through", "back", "around")
_STACK_KEYS = ("url", "backend", "write", "promote")


@dataclasses.dataclass(frozen=True, repr=False)
class TierSpec:
    """One tier, validated: which backend, how to open it, how the stack writes to it."""

    index: int
    backend: str
    url: str | None  # without its query; may carry a password, never shown (see :meth:`shown`)
    options: Mapping[str, Any]  # the backend's options (the URL's query too), namespace and timeout_s included
    write: str
    promote: bool
    config: BackendConfig  # the tier backend's typed config, built to validate the options

    @property
    def capabilities(self) -> Capabilities:
        return self._class().capabilities

    def _class(self) -> type[Backend[Any]]:
        from ectransfer.registry import backend_class

        return backend_class(self.backend)

    def shown(self) -> str:
        """``tier N (backend URL)`` without credentials: for error messages and logs."""
        where = f" {shown_url(self.url)}" if self.url else ""
        return f"tier {self.index} ({self.backend}{where})"

    def describe(self) -> dict[str, Any]:
        """The tier as a dict safe to log (secret options masked by the backend's config)."""
        masked = self.config.describe()
        opts = {k: masked.get(k, v) for k, v in self.options.items() if k not in ("namespace", "timeout_s")}
        return {"backend": self.backend, "url": shown_url(self.url) if self.url else None,
                "write": self.write, "promote": self.promote, "options": opts}

    def open(self) -> Backend[Any]:
        """Open the tier through :func:`ectransfer.open_backend`; errors name the tier."""
        from ectransfer.registry import open_backend

        try:
            return open_backend(self.url, backend=self.backend, **self.options)
        except ECTransferError as exc:
            raise in_tier(self, exc) from exc

    def __repr__(self) -> str:
        return f"<TierSpec {self.shown()} write={self.write} promote={self.promote}>"


def shown_url(url: str) -> str:
    """``url`` without credentials; as given when it cannot carry any (no user part, no query)."""
    return url if "@" not in url and "?" not in url else redact_url(url)


def relabel(exc: ECTransferError, label: str) -> ECTransferError:
    """``exc`` again, same class (callers' ``except`` clauses keep working), prefixed by ``label``."""
    try:
        return type(exc)(f"{label}: {exc}")
    except TypeError:  # a subclass with another constructor: keep the original
        return exc


def in_tier(spec: TierSpec, exc: ECTransferError) -> ECTransferError:
    """``exc`` naming the tier it came from."""
    return relabel(exc, f"tiered backend: {spec.shown()}")


def _load_list(value: Any) -> list[Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"tiered backend: option 'tiers' is not valid JSON ({exc.msg} at character "
                              f"{exc.pos}); expected a list such as "
                              '[{"url": "memory://", "max_bytes": "2GiB"}, {"url": "redis://host:6379"}]') from None
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"tiered backend: option 'tiers' must be a list of tiers, got {type(value).__name__}")
    if not value:
        raise ConfigError("tiered backend: option 'tiers' is required: a list of tiers, fastest first")
    return list(value)


def _parse_one(index: int, raw: Any, *, namespace: str, timeout_s: float) -> TierSpec:
    from ectransfer.registry import backend_class, backend_for_url

    where = f"tiered backend: tier {index}"
    if isinstance(raw, str):
        raw = {"url": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a URL string or a mapping, got {type(raw).__name__}")
    entry = dict(raw)
    url, name = entry.pop("url", None), entry.pop("backend", None)
    for key, value in (("url", url), ("backend", name)):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if url is None and name is None:
        raise ConfigError(f"{where}: needs 'url' (e.g. \"memory://\", \"redis://host:6379\") or 'backend'")
    write = entry.pop("write", "through")
    if write not in WRITE_POLICIES:
        raise ConfigError(f"{where}: 'write' must be one of {', '.join(WRITE_POLICIES)}, got {write!r}")
    promote = entry.pop("promote", True)
    if isinstance(promote, str) and promote.lower() in ("true", "false", "1", "0", "yes", "no"):
        promote = promote.lower() in ("true", "1", "yes")
    if not isinstance(promote, bool):
        raise ConfigError(f"{where}: 'promote' must be true or false, got {promote!r}")
    if url is not None and "://" in url:  # the URL's query options, as open_backend reads them
        url, query = split_query(url)
        entry = {**query, **entry}
    if entry.get("namespace") not in (None, namespace):
        raise ConfigError(f"{where}: 'namespace' belongs to the whole stack: set it on the tiered backend")
    entry["namespace"] = namespace
    entry.setdefault("timeout_s", timeout_s)

    shown = shown_url(url) if url else ""
    try:
        name = name if name is not None else backend_for_url(url or "")
        if name == "tiered":
            raise ConfigError("a tier cannot itself be a tiered stack: list its tiers here instead")
        cls = backend_class(name)
        ok, why = cls.is_available()
        if not ok:
            raise BackendUnavailableError(f"backend {name!r} is not available: {why}")
        if cls.capabilities.peer_to_peer:
            raise ConfigError(f"backend {name!r} is peer-to-peer (entries are freed once read), which a caching "
                              "stack contradicts; use it on its own")
        config = cls.config_from_url(url, entry)
    except ECTransferError as exc:
        raise relabel(exc, f"{where} ({name or '?'}{' ' + shown if shown else ''})") from None
    return TierSpec(index, name, url, entry, write, promote, config)


def parse_tiers(value: Any, *, namespace: str = "", timeout_s: float = 30.0) -> tuple[TierSpec, ...]:
    """Validate every tier of ``value`` (list or JSON string); :class:`ConfigError` names the tier."""
    specs = tuple(_parse_one(i, raw, namespace=namespace, timeout_s=timeout_s)
                  for i, raw in enumerate(_load_list(value)))
    through = [s.index for s in specs if s.write == "through"]
    if not through:
        raise ConfigError("tiered backend: at least one tier needs write='through': the tier a put waits for")
    for s in specs:
        if s.write == "back" and s.index < through[0]:
            raise ConfigError(f"tiered backend: tier {s.index} has write='back' above tier {through[0]}, the first "
                              "write='through' tier: write-back tiers copy down what a faster tier acknowledged")
    return specs


def derive_capabilities(specs: tuple[TierSpec, ...]) -> Capabilities:
    """What a stack can promise, from its tiers' declarations (docs/backends/tiered.md).

    A put is acknowledged once the ``through`` tiers have the item, so sharing and persistence
    come from those; an entry leaves the stack by expiry only if every tier can expire it;
    zero-copy device reads need every tier to have them; peer-to-peer tiers are refused.
    """
    sync = [s.capabilities for s in specs if s.write == "through"]
    every = [s.capabilities for s in specs]
    return Capabilities(
        shared_across_hosts=any(c.shared_across_hosts for c in sync),
        persistent=any(c.persistent for c in sync),
        ttl=all(c.ttl for c in every),
        zero_copy_device=all(c.zero_copy_device for c in every),
        peer_to_peer=False,
    )


@dataclasses.dataclass(frozen=True)
class TieredConfig(BackendConfig):
    """Options of the tiered backend (docs/backends/tiered.md).

    tiers: the tiers, fastest first (a list, or the same list as a JSON string).
    write_back_max_bytes: bytes of acknowledged items waiting for the background writer; a put
        that would exceed it waits for room (up to ``timeout_s``) before it is acknowledged.
    flush_timeout_s: how long ``close()`` waits for the background writer (default ``timeout_s``).
    ``namespace`` and ``timeout_s`` apply to every tier (a tier may set its own ``timeout_s``).
    """

    backend_name: ClassVar[str] = "tiered"
    tiers: Any = dataclasses.field(default=(), repr=False, hash=False)
    write_back_max_bytes: int = size(1 << 30)
    flush_timeout_s: float | None = None
    specs: tuple[TierSpec, ...] = dataclasses.field(default=(), init=False, repr=False, compare=False)

    def validate(self) -> None:
        if self.write_back_max_bytes <= 0:
            raise ConfigError(f"tiered backend: 'write_back_max_bytes' must be > 0, got {self.write_back_max_bytes}")
        if self.flush_timeout_s is not None and not self.flush_timeout_s > 0:
            raise ConfigError(f"tiered backend: 'flush_timeout_s' must be > 0, got {self.flush_timeout_s}")
        object.__setattr__(self, "specs", parse_tiers(self.tiers, namespace=self.namespace,
                                                      timeout_s=self.timeout_s))

    @property
    def capabilities(self) -> Capabilities:
        return derive_capabilities(self.specs)

    def describe(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "timeout_s": self.timeout_s,
                "write_back_max_bytes": self.write_back_max_bytes, "flush_timeout_s": self.flush_timeout_s,
                "tiers": [s.describe() for s in self.specs]}

    def __repr__(self) -> str:
        tiers = ", ".join(f"{s.shown()} write={s.write}" for s in self.specs)
        return f"TieredConfig(namespace={self.namespace!r}, timeout_s={self.timeout_s}, tiers=[{tiers}])"
