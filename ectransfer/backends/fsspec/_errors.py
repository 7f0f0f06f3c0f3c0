"""Turn what fsspec, s3fs, botocore and aiohttp raise into :mod:`ectransfer.errors`.

s3fs already maps S3 error codes to builtins (``NoSuchKey`` -> ``FileNotFoundError``,
``AccessDenied`` -> ``PermissionError``) and keeps the botocore error as ``__cause__``; the
code there tells a missing key from a missing bucket. Messages are scrubbed of every
credential the backend was given, whatever the library put in them (:mod:`._redact`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterable

from ectransfer.backends.fsspec._redact import scrub
from ectransfer.errors import (
    BackendConnectionError,
    ConfigError,
    ECTransferError,
    EntryNotFoundError,
    StorageIOError,
    TransferTimeoutError,
)

__all__ = ["translate"]

_TIMEOUTS = (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 8:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _s3_code(chain: list[BaseException]) -> str:
    for e in chain:
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code:
                return str(code)
    return ""


def _kind(chain: list[BaseException]) -> str:
    """'timeout', 'connection', 'credentials' or '' from the exception chain."""
    try:
        from botocore import exceptions as bex
    except ImportError:  # not an s3 filesystem
        bex = None  # type: ignore[assignment]
    try:
        from aiohttp import ClientConnectionError, ClientPayloadError
    except ImportError:
        ClientConnectionError = ClientPayloadError = ConnectionError  # type: ignore[misc, assignment]
    for e in chain:
        if bex is not None:
            if isinstance(e, (bex.ReadTimeoutError, bex.ConnectTimeoutError)):
                return "timeout"
            if isinstance(e, (bex.NoCredentialsError, bex.PartialCredentialsError,
                              bex.CredentialRetrievalError)):
                return "credentials"
            if isinstance(e, (bex.ConnectionError, bex.HTTPClientError)):
                return "connection"
        if isinstance(e, _TIMEOUTS):
            return "timeout"
        if isinstance(e, (ConnectionError, ClientConnectionError, ClientPayloadError)):
            return "connection"
    return ""


def translate(exc: BaseException, *, op: str, what: str, where: str, bucket: str | None,
              timeout_s: float, secrets: Iterable[str | None]) -> BaseException:
    """The ectransfer error for ``exc``, raised while doing ``op`` on ``what`` at ``where``.

    A missing object is :class:`EntryNotFoundError` only when ``op`` is ``"read"``.
    ``bucket`` is the s3 bucket (None for other protocols). Exceptions that are not I/O
    failures (programming errors) come back unchanged.
    """
    if isinstance(exc, ECTransferError):
        return exc
    secrets = list(secrets)
    chain = _chain(exc)
    detail = scrub(str(exc) or type(exc).__name__, secrets)
    kind = _kind(chain)
    if kind == "timeout":
        return TransferTimeoutError(f"fsspec backend: {op} {what} at {where} timed out "
                                    f"(not done within timeout_s={timeout_s} s, retries included)")
    if kind == "connection":
        return BackendConnectionError(f"fsspec backend: cannot reach {where} to {op} {what}: {detail}")
    if kind == "credentials":
        return ConfigError(f"fsspec backend: no usable credentials for {where} ({detail}); pass key/secret "
                           "or configure the AWS chain (environment, ~/.aws, instance role)")
    code = _s3_code(chain)
    if code == "NoSuchBucket" and bucket is not None:
        return StorageIOError(f"fsspec backend: s3 bucket {bucket!r} does not exist (at {where})")
    if op == "read" and (isinstance(exc, FileNotFoundError) or code in ("NoSuchKey", "404")):
        return EntryNotFoundError(f"no entry {what} at {where}")
    if isinstance(exc, PermissionError) or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                                    "ExpiredToken", "403"):
        target = f"bucket {bucket!r}" if bucket is not None else where
        return StorageIOError(f"fsspec backend: access to {target} denied while trying to {op} {what} "
                              f"({code or detail}): check the credentials and the bucket policy")
    if isinstance(exc, OSError) or kind or code or type(exc).__module__.startswith(("botocore", "aiobotocore")):
        return StorageIOError(f"fsspec backend: cannot {op} {what} at {where}: {detail}")
    return exc
