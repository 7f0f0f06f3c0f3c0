"""Mooncake Store backend (``mooncake://master-host:port``).

Entries live in a Mooncake distributed store run by ``mooncake_master`` and the processes that
mount memory segments into it; this backend moves them through one registered staging buffer.
See :mod:`ectransfer.backends.mooncake.backend` for the data path and overwrite semantics,
:mod:`ectransfer.backends.mooncake.codes` for the error-code table and
``docs/backends/mooncake.md`` for every option and which wheel to install.

Importing this package does not import Mooncake; opening a backend does.
"""

from __future__ import annotations

from ectransfer.backends.mooncake.backend import MooncakeBackend
from ectransfer.backends.mooncake.codes import ERROR_CODES, code_name, error_for
from ectransfer.backends.mooncake.config import MooncakeConfig

__all__ = ["ERROR_CODES", "MooncakeBackend", "MooncakeConfig", "code_name", "error_for"]
