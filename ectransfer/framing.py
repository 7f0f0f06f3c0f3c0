"""Control messages on a stream socket: length-prefixed msgpack frames, typed errors in replies.

Used by every control path that is not data (the connector's scheduler-to-worker channel, the
NIXL producer's control endpoint, the two-process test harness): a frame is a 4-byte
little-endian length then a msgpack map, never pickle; frames above :data:`MAX_FRAME` are
refused. An error crosses as ``{"error": <ectransfer error class name>, "message": ...}`` and is
raised again on the other side as the same :mod:`ectransfer.errors` class.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any

import msgpack

from ectransfer import errors as _errors
from ectransfer.errors import ECTransferError

__all__ = ["MAX_FRAME", "error_from_reply", "error_reply", "recv_frame", "send_frame"]

MAX_FRAME = 64 << 20  # control messages are small; refuse anything absurd
_LEN = struct.Struct("<I")


def send_frame(sock: socket.socket, obj: Any, lock: threading.Lock | None = None) -> None:
    """Send ``obj`` as one frame (``lock`` serialises writers sharing the socket)."""
    data = msgpack.packb(obj, use_bin_type=True)
    frame = _LEN.pack(len(data)) + data
    if lock is None:
        sock.sendall(frame)
    else:
        with lock:
            sock.sendall(frame)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no complete control frame before the deadline")
            sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError("peer closed the connection")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket, deadline: float | None = None) -> Any:
    """One frame's object. ``deadline`` (``time.monotonic()``) bounds the whole read.

    Raises ``ConnectionResetError`` when the peer closed, ``TimeoutError`` at the deadline,
    ``OSError`` for socket errors and for a frame over :data:`MAX_FRAME`.
    """
    (n,) = _LEN.unpack(_recv_exact(sock, 4, deadline))
    if n > MAX_FRAME:
        raise ConnectionResetError(f"control frame of {n} bytes refused (over {MAX_FRAME})")
    return msgpack.unpackb(_recv_exact(sock, n, deadline), raw=False)


def error_reply(exc: BaseException) -> dict[str, str]:
    """The reply that carries ``exc`` (any other exception crosses as ECTransferError, its type
    named in the message)."""
    if isinstance(exc, ECTransferError):
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"error": "ECTransferError", "message": f"{type(exc).__name__}: {exc}"}


def error_from_reply(reply: dict[str, Any]) -> ECTransferError | None:
    """The exception an error reply carries (same ectransfer class), or None for a normal reply."""
    if "error" not in reply:
        return None
    cls = getattr(_errors, str(reply["error"]), None)
    if not (isinstance(cls, type) and issubclass(cls, ECTransferError)):
        return ECTransferError(f"{reply['error']}: {reply.get('message', '')}")
    return cls(str(reply.get("message", "")))
