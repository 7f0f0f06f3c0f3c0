"""ectransfer: move vLLM encoder caches between processes over any transport.

Quick start::

    import ectransfer, torch
    with ectransfer.open_backend("file:///dev/shm/ec") as be:
        be.put("img-0123", torch.randn(1296, 3584, dtype=torch.bfloat16))
        emb = be.get("img-0123")
"""

from __future__ import annotations

from ectransfer.backend import Backend, Capabilities
from ectransfer.config import BackendConfig, parse_size
from ectransfer.errors import (
    BackendClosedError,
    BackendConnectionError,
    BackendUnavailableError,
    CapacityError,
    ConfigError,
    CorruptEntryError,
    ECTransferError,
    EntryNotFoundError,
    IncompatibleTensorError,
    InvalidKeyError,
    StorageIOError,
    TransferTimeoutError,
    UnsupportedVersionError,
)
from ectransfer.keys import validate_key
from ectransfer.registry import available_backends, backend_class, open_backend

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendClosedError",
    "BackendConfig",
    "BackendConnectionError",
    "BackendUnavailableError",
    "Capabilities",
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
    "__version__",
    "available_backends",
    "backend_class",
    "open_backend",
    "parse_size",
    "validate_key",
]
