"""Keep credentials out of messages and logs.

ectransfer's own messages never quote a credential, but the libraries below it may: at DEBUG
level botocore logs each request's headers and canonical request, which carry the access key
id and the session token (never the secret key). While a backend is open, its credentials are
registered with a filter on those loggers that replaces them by ``***``; the filter costs
nothing unless DEBUG logging is on for them.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable

__all__ = ["forget", "register", "scrub"]

#: the loggers seen quoting credentials (botocore 1.43 at DEBUG level)
_LOGGERS = ("botocore.endpoint", "botocore.auth", "aiobotocore.endpoint")
_MIN_LEN = 4  # shorter strings would blank unrelated text; no real credential is that short


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every credential in ``secrets`` replaced by ``***``."""
    for s in secrets:
        if s and len(s) >= _MIN_LEN:
            text = text.replace(s, "***")
    return text


class _ScrubFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.secrets: Counter[str] = Counter()
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        with self.lock:
            secrets = list(self.secrets)
        if secrets:
            message = record.getMessage()
            clean = scrub(message, secrets)
            if clean != message:
                record.msg, record.args = clean, None
        return True


_FILTER = _ScrubFilter()
_INSTALLED = False


def register(secrets: Iterable[str | None]) -> list[str]:
    """Scrub ``secrets`` from the libraries' log records until :func:`forget`; returns them."""
    global _INSTALLED
    kept = [s for s in secrets if s and len(s) >= _MIN_LEN]
    with _FILTER.lock:
        _FILTER.secrets.update(kept)
        if not _INSTALLED:
            for name in _LOGGERS:
                logging.getLogger(name).addFilter(_FILTER)
            _INSTALLED = True
    return kept


def forget(secrets: Iterable[str]) -> None:
    """Undo one :func:`register` of ``secrets``."""
    with _FILTER.lock:
        _FILTER.secrets.subtract(secrets)
        for s in [s for s, n in _FILTER.secrets.items() if n <= 0]:
            del _FILTER.secrets[s]
