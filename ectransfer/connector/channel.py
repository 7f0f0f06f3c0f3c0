"""The control channel between the scheduler side and each worker side.

Why a channel of our own: a consumer defers a request until its items are fetched and verified,
and a step in which every request is deferred schedules no tokens, so vLLM runs no worker code
and per-step metadata would never reach the worker. The scheduler therefore sends fetch and
drop requests straight to every worker, which answers with ``ready``/``failed`` events.

Transport: a Linux abstract Unix socket per worker (no file to clean up, no port to choose),
named from the engine id and the worker's data-parallel and tensor-parallel rank; the server
accepts only peers of the same user (``SO_PEERCRED``). Frames are :mod:`ectransfer.framing`'s
(length-prefixed msgpack maps; no pickle). The scheduler and its workers always share a host.

Messages, scheduler -> worker: ``{"op": "fetch", "items": [ItemRef wire], "wait_s": float,
"announced": [bool]}`` and ``{"op": "drop", "ids": [item_id]}``. Worker -> scheduler:
``{"ev": "ready", "id": item_id, "nbytes": int}`` and ``{"ev": "failed", "id": item_id,
"kind": "missing|corrupt|timeout|capacity|shape|error", "reason": str}``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from ectransfer.framing import recv_frame, send_frame

__all__ = ["ChannelClient", "ChannelServer", "channel_address"]

log = logging.getLogger(__name__)

_SO_PEERCRED_FMT = "3i"
_MAX_BACKLOG = 4096  # messages kept per unreachable worker


def channel_address(engine_id: str, dp_rank: int, tp_rank: int) -> str:
    """The abstract socket name of one worker's channel."""
    digest = hashlib.blake2b(engine_id.encode(), digest_size=8).hexdigest()
    return f"\0ectransfer-{digest}-dp{dp_rank}-tp{tp_rank}"


class ChannelServer:
    """A worker's end: calls ``handler(message, reply)`` for each message, on a reader thread.

    ``reply(event)`` sends an event back on the connection the message came from; it is safe to
    call from any thread, and a reply to a scheduler that went away is dropped.
    """

    def __init__(self, address: str, handler: Callable[[dict[str, Any], Callable[[dict[str, Any]], None]], None]):
        self.address = address
        self._handler = handler
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(address)
        except OSError as exc:
            self._sock.close()
            raise OSError(f"ectransfer control channel {address[1:]!r} is already in use "
                          f"(another worker with the same engine id and rank?): {exc}") from exc
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self._closed = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="ectransfer-channel", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(_SO_PEERCRED_FMT))
            _pid, uid, _gid = struct.unpack(_SO_PEERCRED_FMT, creds)
            if uid != os.getuid():
                log.warning("ectransfer control channel: refused a peer of uid %d", uid)
                conn.close()
                continue
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), name="ectransfer-channel-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        send_lock = threading.Lock()

        def reply(event: dict[str, Any]) -> None:
            try:
                send_frame(conn, event, send_lock)
            except OSError:
                pass  # the scheduler went away; it re-sends what it still needs

        try:
            while not self._closed.is_set():
                try:
                    msg = recv_frame(conn)
                except ConnectionResetError:
                    return  # the scheduler went away (or sent an absurd frame)
                try:
                    self._handler(msg, reply)
                except Exception:  # one bad message must not end the channel
                    log.exception("ectransfer control channel: handler failed on %r", msg.get("op"))
        except (OSError, ValueError) as exc:
            if not self._closed.is_set():
                log.warning("ectransfer control channel: connection dropped: %s", exc)
        finally:
            conn.close()

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        with self._lock:
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._thread.join(timeout=5)


class ChannelClient:
    """The scheduler's end: one connection per worker, (re)connected lazily; events queue up.

    :meth:`send` never blocks the caller for long: a worker that is not reachable yet keeps the
    message in a small backlog, sent once the connection succeeds.
    """

    def __init__(self, addresses: list[str], *, connect_timeout_s: float = 1.0) -> None:
        self.addresses = addresses
        self._connect_timeout_s = connect_timeout_s
        self._socks: dict[str, socket.socket] = {}
        self._send_locks = {a: threading.Lock() for a in addresses}
        self._backlog: dict[str, list[dict[str, Any]]] = {a: [] for a in addresses}
        self._next_try: dict[str, float] = dict.fromkeys(addresses, 0.0)
        self.events: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()

    def _connect(self, address: str) -> socket.socket | None:
        sock = self._socks.get(address)
        if sock is not None:
            return sock
        now = time.monotonic()
        if now < self._next_try[address]:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._connect_timeout_s)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            self._next_try[address] = now + 0.1
            return None
        sock.settimeout(None)
        self._socks[address] = sock
        threading.Thread(target=self._read_loop, args=(address, sock), name="ectransfer-channel-read",
                         daemon=True).start()
        return sock

    def _read_loop(self, address: str, sock: socket.socket) -> None:
        try:
            while True:
                self.events.put(recv_frame(sock))
        except (OSError, ValueError):
            pass
        with self._lock:
            if self._socks.get(address) is sock:
                del self._socks[address]
        if not self._closed:
            self.events.put({"ev": "disconnected", "address": address})

    def send(self, msg: dict[str, Any]) -> None:
        """Send ``msg`` to every worker (backlogged for workers not reachable yet)."""
        with self._lock:
            for address in self.addresses:
                backlog = self._backlog[address]
                backlog.append(msg)
                if len(backlog) > _MAX_BACKLOG:  # a worker that never comes: its fetches time out anyway
                    del backlog[: len(backlog) - _MAX_BACKLOG]
                self._flush(address)

    def _flush(self, address: str) -> None:
        sock = self._connect(address)
        if sock is None:
            return
        pending = self._backlog[address]
        try:
            while pending:
                send_frame(sock, pending[0], self._send_locks[address])
                pending.pop(0)
        except OSError:
            sock.close()
            self._socks.pop(address, None)

    def poll(self) -> list[dict[str, Any]]:
        """Flush backlogs, then return every event received so far."""
        with self._lock:
            for address in self.addresses:
                if self._backlog[address]:
                    self._flush(address)
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self._closed = True
        with self._lock:
            for sock in self._socks.values():
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._socks.clear()
