"""The fault-test proxy forwards, stalls and resumes real TCP traffic."""

from __future__ import annotations

import socket
import threading

import pytest

from ectransfer.testing.proxy import StallingProxy


@pytest.fixture
def echo_server() -> object:
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            with c:
                while data := c.recv(4096):
                    c.sendall(data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    srv.close()
    t.join(5)


def test_forwards_stalls_and_resumes(echo_server: int) -> None:
    with StallingProxy(echo_server) as proxy, socket.create_connection(("127.0.0.1", proxy.port), 5) as c:
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
        proxy.stall()
        c.settimeout(0.5)
        c.sendall(b"held")
        with pytest.raises(TimeoutError):
            c.recv(4)
        proxy.resume()
        c.settimeout(5)
        assert c.recv(4) == b"held"
