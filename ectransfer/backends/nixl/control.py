"""The control protocol between consumers and a producer: msgpack over TCP, never the data.

Each message is a u32 little-endian length followed by one msgpack map. A request carries
``op``; a reply is a map, or ``{"error": "<ectransfer.errors class>", "message": ...}``.

=========  ==============================================  =====================================
op         request                                         reply
=========  ==============================================  =====================================
exists     ``keys``                                        ``found``: one bool per key
lookup     ``keys``, ``pin_s``                             ``agent`` (NIXL agent name), ``items``:
                                                           per key nil or a location (below)
metadata                                                   ``agent``, ``metadata`` (NIXL bytes)
unpin      (only the ``unpin`` field below)                ``{}``
free       ``keys`` (the reader released or deleted them)  ``{}``
=========  ==============================================  =====================================

Any request may carry ``unpin``: ``[[key, version], ...]``, the pins its consumer is done with;
they ride on the next message to that producer (usually the release after a load) rather than
costing a message of their own on the load path.

A location is ``{"v": version, "head": header bytes, "total": entry bytes, "addr": entry
address, "dev": device id, "mem": "DRAM" | "VRAM"}``: the consumer parses the header before
it moves a byte, then READs the payload ``[addr + len(head), addr + total)``. A lookup pins
the version it returns for ``pin_s`` seconds (or until ``unpin``), so the producer cannot
reuse those bytes while a consumer may still be reading them.

Every op is idempotent, so a client retries once on a pooled connection that turned out to be
dead (the producer restarted). Descriptors travel as plain integers, not NIXL's pickled form:
no pickle on any wire.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack

from ectransfer.errors import BackendConnectionError, ConfigError, ECTransferError, TransferTimeoutError
from ectransfer.framing import error_from_reply, error_reply, recv_frame, send_frame

__all__ = ["ControlClient", "ControlServer", "recv_message", "send_message"]

log = logging.getLogger(__name__)

# The framing and the typed error replies are the package's own (ectransfer.framing).
send_message = send_frame
recv_message = recv_frame


def raise_error_reply(reply: dict[str, Any]) -> None:
    exc = error_from_reply(reply)
    if exc is not None:
        raise exc


class ControlServer:
    """Serves one producer's control endpoint: a listener thread plus a thread per connection.

    ``handler(request) -> reply`` runs on the connection's thread; an exception becomes an
    error reply. ``close()`` stops listening and drops every connection.
    """

    def __init__(self, host: str, port: int, handler: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self._handler = handler
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._listener = socket.create_server((host, port), family=family, backlog=128)
        except OSError as exc:
            raise BackendConnectionError(
                f"nixl producer cannot listen on {host}:{port}: {exc.strerror or exc} "
                "(is another producer already serving it?)"
            ) from exc
        self.address = (host, port)
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name=f"nixl-control-{port}", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._closed.is_set():
                    return
                time.sleep(0.01)  # e.g. EMFILE: do not spin
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed.is_set():
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="nixl-control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                try:
                    request = recv_message(conn)
                except (OSError, ValueError, msgpack.UnpackException):
                    return
                try:
                    if not isinstance(request, dict):
                        raise ConfigError("control request must be a map")
                    reply = self._handler(request)
                except Exception as exc:
                    if not isinstance(exc, ECTransferError):
                        log.exception("nixl control request %r failed", request.get("op") if isinstance(request, dict) else "?")
                    reply = error_reply(exc)
                try:
                    send_message(conn, reply)
                except OSError:
                    return
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        self._closed.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self._thread.join(timeout=5)


class ControlClient:
    """Requests to one producer over a small pool of connections (safe from many threads).

    A connection is borrowed for one request and returned only after a complete reply, so a
    timed-out request never leaves a half-read reply for the next caller.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    def _connect(self, deadline: float) -> socket.socket:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock = socket.create_connection((self.host, self.port), timeout=left)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def request(self, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send ``message`` and return the reply; typed errors only, bounded by ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        for attempt in (0, 1):
            with self._lock:
                if self._closed:
                    raise BackendConnectionError(f"nixl control client for {self.name} is closed")
                sock = self._idle.pop() if self._idle else None
            reused = sock is not None
            try:
                if sock is None:
                    sock = self._connect(deadline)
                sock.settimeout(max(deadline - time.monotonic(), 1e-3))
                send_message(sock, message)
                reply = recv_message(sock, deadline)
            except TimeoutError:
                if sock is not None:
                    sock.close()
                raise TransferTimeoutError(
                    f"nixl producer {self.name} did not answer {message.get('op')!r} within {timeout_s:g} s"
                ) from None
            except OSError as exc:
                if sock is not None:
                    sock.close()
                if reused and attempt == 0:
                    continue  # a pooled connection died (producer restarted): retry once, fresh
                raise BackendConnectionError(
                    f"nixl producer {self.name} is unreachable: {exc.strerror or exc}"
                ) from None
            except (ValueError, msgpack.UnpackException) as exc:
                if sock is not None:
                    sock.close()
                raise BackendConnectionError(f"nixl producer {self.name} sent a malformed reply: {exc}") from None
            with self._lock:
                if self._closed:
                    sock.close()
                else:
                    self._idle.append(sock)
            if not isinstance(reply, dict):
                raise BackendConnectionError(f"nixl producer {self.name} sent a malformed reply")
            raise_error_reply(reply)
            return reply
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for s in idle:
            s.close()
