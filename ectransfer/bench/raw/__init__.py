"""Raw-client baselines for ``ectransfer-bench --baseline``.

For each backend, ``ectransfer.bench.raw.<backend>`` defines ``Raw``, a :class:`RawClient`
that moves the same bytes with the transport's own client and nothing of ectransfer in between
(plain file write/read, redis-py SET/GET, s3fs pipe/cat, Mooncake put_from/get_into, a NIXL
transfer). The bench times it side by side with the backend.
"""

from __future__ import annotations

import abc
import importlib
from typing import Any

__all__ = ["RawClient", "raw_client_class"]


class RawClient(abc.ABC):
    """The transport's own client doing the same bytes.

    ``url`` and ``options`` are what the backend was opened with (the bench passes both).
    """

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self.url = url
        self.options = options

    @abc.abstractmethod
    def write(self, name: str, data: memoryview) -> None:
        """Store ``data`` under ``name`` (``name`` is a valid ectransfer key)."""

    @abc.abstractmethod
    def read_into(self, name: str, out: memoryview) -> None:
        """Fill ``out`` (exactly ``len(out)`` bytes) with what was stored under ``name``."""

    def delete(self, name: str) -> None:  # noqa: B027 - optional
        """Remove ``name`` (optional)."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release the client."""


def raw_client_class(backend: str) -> type[RawClient] | None:
    """``Raw`` of ``ectransfer.bench.raw.<backend>``, or None if the backend has no baseline."""
    try:
        module = importlib.import_module(f"{__name__}.{backend}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.{backend}":
            return None
        raise
    cls: type[RawClient] = module.Raw
    return cls
