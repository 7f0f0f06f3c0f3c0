"""Typed errors raised by ectransfer.

Every error derives from :class:`ECTransferError`. Where a caller would naturally catch a
builtin (``KeyError`` for a missing entry, ``TimeoutError`` for a timeout, ...), the error also
derives from that builtin, so ``except KeyError`` keeps working for code that knows nothing
about ectransfer.

Messages name what was wrong (the key, the option, the extra to install) and never contain
credentials: backends pass URLs through :func:`ectransfer.config.redact_url` before quoting them.
"""

from __future__ import annotations

__all__ = [
    "BackendClosedError",
    "BackendConnectionError",
    "BackendUnavailableError",
    "CapacityError",
    "ConfigError",
    "CorruptEntryError",
    "ECTransferError",
    "EntryNotFoundError",
    "IncompatibleTensorError",
    "InvalidKeyError",
    "StorageIOError",
    "TransferTimeoutError",
    "UnsupportedVersionError",
]


class ECTransferError(Exception):
    """Base class of every error ectransfer raises on purpose."""


class InvalidKeyError(ECTransferError, ValueError):
    """A key (or namespace) is not a valid ectransfer key; raised before any I/O."""


class EntryNotFoundError(ECTransferError, KeyError):
    """No entry is stored under the key (never written, deleted, evicted or expired)."""

    def __str__(self) -> str:  # KeyError quotes its argument; a sentence reads better
        return str(self.args[0]) if self.args else "entry not found"


class CorruptEntryError(ECTransferError):
    """An entry exists but failed validation (checksum, truncation, impossible header).

    The data is never returned to the caller.
    """


class IncompatibleTensorError(ECTransferError, ValueError):
    """The caller's destination tensor does not match the stored entry (dtype, shape, device)."""


class BackendUnavailableError(ECTransferError, ImportError):
    """A backend cannot be used here, typically because an optional dependency is missing.

    The message names the extra to install, e.g. ``pip install 'ectransfer[redis]'``.
    """


class TransferTimeoutError(ECTransferError, TimeoutError):
    """A network call or a wait did not complete within its timeout."""


class BackendConnectionError(ECTransferError, ConnectionError):
    """The backend's server or peer could not be reached, or dropped the connection."""


class ConfigError(ECTransferError, ValueError):
    """A URL or option is invalid; the message names the offending option."""


class BackendClosedError(ECTransferError, RuntimeError):
    """A backend was used after :meth:`~ectransfer.Backend.close`."""


class CapacityError(ECTransferError, OSError):
    """An entry cannot be stored because it exceeds a configured capacity bound."""


class StorageIOError(ECTransferError, OSError):
    """The storage medium failed an operation (I/O error, permission denied, ...)."""


class UnsupportedVersionError(ECTransferError, ImportError):
    """An integrated framework (vLLM) is older than the one ectransfer's adapter supports."""
