"""Backend registry: names to lazily imported classes, URL schemes to names.

Built-in backends are a table of ``name -> "module:Class"`` strings; nothing is imported until
a backend is asked for. Third-party backends register through the entry-point group
``ectransfer.backends`` (the built-ins are declared there too); a built-in name cannot be
taken over by a third party.
"""

from __future__ import annotations

import importlib
import logging
import os
from importlib.metadata import entry_points
from typing import Any
from urllib.parse import urlsplit

from ectransfer.backend import Backend
from ectransfer.config import redact_url, split_query
from ectransfer.errors import BackendUnavailableError, ConfigError

__all__ = ["BUILTIN_BACKENDS", "available_backends", "backend_class", "backend_for_url", "open_backend",
           "registered_backends"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "ectransfer.backends"

#: built-in backends, sorted by name
BUILTIN_BACKENDS: dict[str, str] = {
    "fs": "ectransfer.backends.fs:FsBackend",
    "fsspec": "ectransfer.backends.fsspec:FsspecBackend",
    "memory": "ectransfer.backends.memory:MemoryBackend",
    "mooncake": "ectransfer.backends.mooncake:MooncakeBackend",
    "nixl": "ectransfer.backends.nixl:NixlBackend",
    "redis": "ectransfer.backends.redis:RedisBackend",
    "tiered": "ectransfer.backends.tiered:TieredBackend",
}

#: the pip extra that installs each backend's optional dependency
EXTRAS: dict[str, str] = {"fsspec": "s3", "mooncake": "mooncake", "nixl": "nixl", "redis": "redis"}

#: URL scheme -> backend name; schemes not listed go to fsspec if it knows them
SCHEMES: dict[str, str] = {
    "file": "fs",
    "memory": "memory",
    "mooncake": "mooncake",
    "nixl": "nixl",
    "redis": "redis",
    "redis+cluster": "redis",
    "rediss": "redis",
    "rediss+cluster": "redis",
    "s3": "fsspec",
    "s3a": "fsspec",
    "tiered": "tiered",
    "unix": "redis",
}


def registered_backends() -> dict[str, str]:
    """Every registered backend name with its ``"module:Class"`` target."""
    table = dict(BUILTIN_BACKENDS)
    try:
        eps = entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # noqa: BLE001 - broken metadata of another distribution must not break us
        eps = ()  # type: ignore[assignment]
    for ep in eps:
        if ep.name in BUILTIN_BACKENDS:
            if ep.value != BUILTIN_BACKENDS[ep.name]:
                log.warning("ignoring entry point %r=%r: %r is a built-in backend", ep.name, ep.value, ep.name)
            continue
        table[ep.name] = ep.value
    return dict(sorted(table.items()))


def backend_class(name: str) -> type[Backend[Any]]:
    """Import and return the backend class registered as ``name``."""
    table = registered_backends()
    target = table.get(name)
    if target is None:
        raise ConfigError(f"unknown backend {name!r}; registered backends: {', '.join(table)}")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = EXTRAS.get(name)
        hint = f"; install it with: pip install 'ectransfer[{extra}]'" if extra else ""
        raise BackendUnavailableError(f"backend {name!r} cannot be imported ({exc}){hint}") from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(f"backend {name!r}: {target} is not an ectransfer Backend subclass")
    return cls


def available_backends() -> list[tuple[str, bool, str]]:
    """``(name, available, reason)`` for every registered backend; never raises."""
    rows = []
    for name in registered_backends():
        try:
            ok, why = backend_class(name).is_available()
        except Exception as exc:  # noqa: BLE001 - a broken backend is "not available", never a crash
            ok, why = False, str(exc)
        if not ok and name in EXTRAS and "pip install" not in why:
            why = f"{why} (pip install 'ectransfer[{EXTRAS[name]}]')"
        rows.append((name, ok, why))
    return rows


def backend_for_url(url: str) -> str:
    """The backend name a URL (or a plain path) selects; :class:`ConfigError` if none does."""
    if "://" not in url:
        # "memory:" or "redis:/x" would otherwise become a directory of that name in the
        # working directory: a known scheme without "//" is a typo, not a path.
        head, colon, _ = url.partition(":")
        if colon and head.lower() in SCHEMES and "/" not in head:
            raise ConfigError(f"{redact_url(url)!r} looks like a {head}:// URL with '//' missing; "
                              f"write {head}://... (or ./{url} for a directory of that name)")
        return "fs"  # a plain path
    scheme = urlsplit(url).scheme.lower()
    if scheme in SCHEMES:
        return SCHEMES[scheme]
    try:
        import fsspec  # noqa: F401  (optional)
        from fsspec.registry import known_implementations
    except ImportError:
        raise ConfigError(
            f"unknown URL scheme {scheme!r} in {redact_url(url)}; known schemes: {', '.join(sorted(SCHEMES))} "
            "(other filesystems go through fsspec: pip install 'ectransfer[s3]')"
        ) from None
    if scheme in known_implementations:
        return "fsspec"
    raise ConfigError(f"unknown URL scheme {scheme!r} in {redact_url(url)}; known schemes: {', '.join(sorted(SCHEMES))}")


def open_backend(url: str | None = None, **options: Any) -> Backend[Any]:
    """Open a backend from a URL and/or options.

    ``url`` selects the backend by scheme (``file:///mnt/ec`` or a plain path -> fs,
    ``memory://`` -> memory, ``redis://``, ``s3://``, ``mooncake://``, ``nixl://``...);
    ``backend="name"`` selects it explicitly (and wins over the scheme). Query parameters of
    the URL are options too (``file:///mnt/ec?fsync=true``). Unknown or invalid options raise
    :class:`~ectransfer.errors.ConfigError` naming the option.
    """
    name = options.pop("backend", None)
    if url is not None and not isinstance(url, str):
        raise ConfigError(f"url must be a string, got {type(url).__name__}")
    if url is not None and "://" in url:
        url, query = split_query(url)
        for k, v in query.items():
            options.setdefault(k, v)
    if name is None:
        if url is None:
            raise ConfigError("open_backend needs a URL or backend=NAME")
        name = backend_for_url(os.fspath(url))
    if not isinstance(name, str):
        raise ConfigError(f"option 'backend' must be a string, got {type(name).__name__}")
    cls = backend_class(name)
    ok, why = cls.is_available()
    if not ok:
        extra = cls.extra or EXTRAS.get(name)
        hint = f"; install it with: pip install 'ectransfer[{extra}]'" if extra and "pip install" not in why else ""
        raise BackendUnavailableError(f"backend {name!r} is not available: {why}{hint}")
    return cls.open(url, **options)
