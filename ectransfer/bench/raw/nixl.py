"""Raw NIXL baseline: the same bytes moved between two NIXL agents.

:class:`Raw` sets up a *peer* agent that registers one buffer and hands over its agent
metadata and buffer address. ``write`` is a NIXL WRITE from the caller's bytes into the peer's
buffer; ``read_into`` a NIXL READ from it into the caller's buffer, both registered for the call (microseconds for host memory), exactly as
the backend's ``landing="direct"`` does, but without lookups, leases or checksums.
``push_into`` has the peer WRITE into our buffer on request: the push alternative to a pull.

The peer agent lives in this process (as ``ectransfer-bench`` runs the backend's producer and
consumer in one process) or, with ``peer_process=True``, in a child process.

``python -m ectransfer.bench.raw.nixl`` measures, in one run, raw READ (pull) against raw
WRITE-on-request (push) and the nixl backend's ``get_into`` (producer in another process)
against the raw READ of the same bytes, with the raw peer in another process too.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

from ectransfer.bench.raw import RawClient
from ectransfer.config import parse_size
from ectransfer.errors import BackendConnectionError, CapacityError, TransferTimeoutError

__all__ = ["Raw"]

_DEFAULT_PEER_BYTES = 1 << 30


def _agent(name: str, *, serves: bool) -> Any:
    """An agent configured as the backend's: a progress thread (waiting, not spinning) only
    where the agent is the passive side of transfers (see :mod:`ectransfer.backends.nixl.agent`)."""
    from ectransfer.backends.nixl.agent import new_nixl_agent

    return new_nixl_agent(name, progress=serves)


def _wait(agent: Any, handle: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    state = agent.transfer(handle)
    while state == "PROC":
        if time.monotonic() > deadline:
            raise TransferTimeoutError("raw NIXL transfer did not finish in time")
        state = agent.check_xfer_state(handle)
    agent.release_xfer_handle(handle)
    if state != "DONE":
        raise BackendConnectionError(f"raw NIXL transfer failed ({state})")


def _address(buf: memoryview) -> int:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data) if len(buf) else 0


class _LocalPeer:
    """The peer agent in this process: what ``ectransfer-bench`` compares with, since it runs the
    backend's producer and consumer in one process too."""

    def __init__(self, size: int) -> None:
        import torch

        self.agent = _agent(f"raw-peer-{os.getpid()}-{id(self):x}", serves=True)
        self.buf = torch.zeros(size, dtype=torch.uint8)
        self.registration = self.agent.register_memory([(self.buf.data_ptr(), size, 0, "")], "DRAM")
        self.addr, self.size = int(self.buf.data_ptr()), size
        self._initiator = ""

    def metadata(self) -> bytes:
        md: bytes = self.agent.get_agent_metadata()
        return md

    def push(self, src: int, dst: int, n: int, initiator_md: bytes | None, timeout_s: float) -> None:
        if initiator_md is not None:
            self._initiator = self.agent.add_remote_agent(initiator_md)
        a = self.agent
        handle = a.initialize_xfer("WRITE", a.get_xfer_descs([(self.addr + src, n, 0)], "DRAM"),
                                   a.get_xfer_descs([(dst, n, 0)], "DRAM"), self._initiator)
        _wait(a, handle, timeout_s)

    def close(self) -> None:
        self.agent.deregister_memory(self.registration)


class _ProcessPeer:
    """The peer agent in a child process (``python -m ectransfer.bench.raw.nixl peer SIZE PORT``)."""

    def __init__(self, size: int) -> None:
        from ectransfer.backends.nixl.control import recv_message

        self._recv = recv_message
        with socket.socket() as probe:  # a free loopback port; the peer binds it
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        self.proc = subprocess.Popen([sys.executable, "-m", "ectransfer.bench.raw.nixl", "peer", str(size), str(port)],
                                     stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        self.sock = self._connect(port, 60.0)
        hello = self._recv(self.sock, time.monotonic() + 60)
        self._metadata: bytes = hello["metadata"]
        self.addr, self.size = int(hello["addr"]), int(hello["size"])

    def _connect(self, port: int, timeout_s: float) -> socket.socket:
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=60)
            except OSError:
                time.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        raise BackendConnectionError(f"the raw NIXL peer process did not listen on 127.0.0.1:{port}")

    def metadata(self) -> bytes:
        return self._metadata

    def push(self, src: int, dst: int, n: int, initiator_md: bytes | None, timeout_s: float) -> None:
        from ectransfer.backends.nixl.control import send_message

        msg: dict[str, Any] = {"src": src, "dst": dst, "len": n}
        if initiator_md is not None:
            msg["metadata"] = initiator_md
        send_message(self.sock, msg)
        reply = self._recv(self.sock, time.monotonic() + timeout_s)
        if reply.get("state") != "DONE":
            raise BackendConnectionError(f"raw NIXL push failed ({reply})")

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class Raw(RawClient):
    """Two NIXL agents and nothing of ectransfer in between (see the module docstring).

    The peer agent lives in this process by default (as the bench's producer does), or in a
    child process with ``peer_process=True``. ``push=True`` gives our agent a progress thread,
    which :meth:`push_into` needs (the peer's WRITE into our buffer needs us to progress).
    """

    def __init__(self, url: str, options: dict[str, Any], *, peer_process: bool = False, push: bool = False) -> None:
        super().__init__(url, options)
        from ectransfer.backends.nixl.arena import Allocator

        size = parse_size(options.get("arena_bytes", _DEFAULT_PEER_BYTES), what="arena_bytes")
        self.timeout_s = float(options.get("timeout_s", 30.0))
        self._peer: _LocalPeer | _ProcessPeer = _ProcessPeer(size) if peer_process else _LocalPeer(size)
        self._push = push
        self._agent = _agent(f"raw-initiator-{os.getpid()}-{id(self):x}", serves=push)
        self._peer_name = self._agent.add_remote_agent(self._peer.metadata())
        self._space = Allocator(self._peer.size)
        self._slots: dict[str, Any] = {}
        self._push_targets: dict[tuple[int, int], Any] = {}

    def _slot(self, name: str, n: int) -> int:
        slot = self._slots.get(name)
        if slot is None or slot.length != n:
            if slot is not None:
                self._space.free(slot)
            slot = self._space.alloc(n)
            if slot is None:
                raise CapacityError(f"raw NIXL peer buffer ({self._peer.size} bytes) is full")
            self._slots[name] = slot
        return int(slot.offset)

    def _xfer(self, op: str, buf: memoryview, remote_off: int) -> None:
        n = len(buf)
        if not n:
            return
        addr = _address(buf)
        a = self._agent
        reg = a.register_memory([(addr, n, 0, "")], "DRAM")
        try:
            handle = a.initialize_xfer(op, a.get_xfer_descs([(addr, n, 0)], "DRAM"),
                                       a.get_xfer_descs([(self._peer.addr + remote_off, n, 0)], "DRAM"),
                                       self._peer_name)
            _wait(a, handle, self.timeout_s)
        finally:
            a.deregister_memory(reg)

    def write(self, name: str, data: memoryview) -> None:
        self._xfer("WRITE", memoryview(data).cast("B"), self._slot(name, len(data)))

    def read_into(self, name: str, out: memoryview) -> None:
        slot = self._slots[name]
        view = memoryview(out).cast("B")
        if len(view) != slot.length:
            raise ValueError(f"{name!r} is {slot.length} bytes, destination is {len(view)}")
        self._xfer("READ", view, slot.offset)

    def push_into(self, name: str, out: memoryview) -> None:
        """The peer WRITEs ``name`` into ``out`` on request (push), returning when it landed.

        A push target must be known to the peer before the WRITE, so ``out`` stays registered
        (like a receive buffer registered once) and the peer gets fresh metadata when it grows.
        """
        if not self._push:
            raise ValueError("push_into needs Raw(..., push=True): the peer's WRITE needs our agent to progress")
        slot = self._slots[name]
        view = memoryview(out).cast("B")
        addr = _address(view)
        md = None
        if (addr, slot.length) not in self._push_targets:
            self._push_targets[(addr, slot.length)] = self._agent.register_memory([(addr, slot.length, 0, "")], "DRAM")
            md = self._agent.get_agent_metadata()
        self._peer.push(slot.offset, addr, slot.length, md, self.timeout_s)

    def delete(self, name: str) -> None:
        slot = self._slots.pop(name, None)
        if slot is not None:
            self._space.free(slot)

    def close(self) -> None:
        for reg in self._push_targets.values():
            self._agent.deregister_memory(reg)
        self._peer.close()


def _serve_peer(size: int, port: int) -> None:
    """The peer process: one registered buffer, one client, WRITEs on request."""
    import torch

    from ectransfer.backends.nixl.control import recv_message, send_message

    agent = _agent(f"raw-peer-{os.getpid()}", serves=True)
    buf = torch.zeros(size, dtype=torch.uint8)
    agent.register_memory([(buf.data_ptr(), size, 0, "")], "DRAM")
    listener = socket.create_server(("127.0.0.1", port))
    listener.settimeout(60)
    conn, _ = listener.accept()
    send_message(conn, {"metadata": agent.get_agent_metadata(), "addr": buf.data_ptr(), "size": size})
    initiator = None
    while True:
        try:
            msg = recv_message(conn)
        except OSError:
            return
        if "metadata" in msg:
            initiator = agent.add_remote_agent(msg["metadata"])
        handle = agent.initialize_xfer("WRITE", agent.get_xfer_descs([(buf.data_ptr() + msg["src"], msg["len"], 0)], "DRAM"),
                                       agent.get_xfer_descs([(msg["dst"], msg["len"], 0)], "DRAM"), initiator)
        try:
            _wait(agent, handle, 30)
            send_message(conn, {"state": "DONE"})
        except (BackendConnectionError, TransferTimeoutError) as exc:
            send_message(conn, {"state": str(exc)})


def _measure(argv: list[str]) -> int:
    import torch

    from ectransfer.codec import payload_view
    from ectransfer.testing.servers import free_port
    from ectransfer.testing.servers.nixl import open_peer_pair

    p = argparse.ArgumentParser(prog="python -m ectransfer.bench.raw.nixl")
    p.add_argument("--size", default="8MiB")
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--landing", default="direct", choices=["direct", "buffer"])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    n = parse_size(args.size)
    items = [torch.randint(0, 256, (n,), dtype=torch.uint8) for _ in range(args.count)]
    outs = [torch.empty(n, dtype=torch.uint8) for _ in range(args.count)]
    opts = {"arena_bytes": max(2 * n * args.count, 64 << 20), "recv_buffer_bytes": 2 * n, "landing": args.landing}
    raw = Raw("", opts, peer_process=True)
    pusher = Raw("", opts, peer_process=True, push=True)
    pair = open_peer_pair(f"nixl://127.0.0.1:{free_port()}", opts)
    try:
        for i, t in enumerate(items):
            raw.write(f"k{i}", payload_view(t))
            pusher.write(f"k{i}", payload_view(t))
            pair.put(f"k{i}", t)

        def timed(fn: Any) -> float:
            t0 = time.perf_counter()
            for i in range(args.count):
                fn(i)
            return float(n * args.count / (time.perf_counter() - t0) / 1e6)

        runs: dict[str, list[float]] = {"raw READ (pull)": [], "raw WRITE on request (push)": [],
                                        f"backend get_into ({args.landing})": [], "backend get": []}
        for _ in range(args.repeat):  # interleaved, so load changes hit every variant alike
            runs["raw READ (pull)"].append(timed(lambda i: raw.read_into(f"k{i}", payload_view(outs[i]))))
            runs["raw WRITE on request (push)"].append(
                timed(lambda i: pusher.push_into(f"k{i}", payload_view(outs[i]))))
            runs[f"backend get_into ({args.landing})"].append(timed(lambda i: pair.get_into(f"k{i}", outs[i])))
            runs["backend get"].append(timed(lambda i: pair.get(f"k{i}")))
        assert all(torch.equal(o, t) for o, t in zip(outs, items))
        base = statistics.median(runs["raw READ (pull)"])
        print(f"{args.count} x {n / 1e6:.1f} MB, median of {args.repeat} interleaved runs (MB/s, ratio to raw READ)")
        for name, values in runs.items():
            med = statistics.median(values)
            print(f"  {name:32s} {med:9.0f}  {med / base:5.2f}x   [{min(values):.0f}-{max(values):.0f}]")
    finally:
        pair.close()
        pusher.close()
        raw.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "peer":
        _serve_peer(int(sys.argv[2]), int(sys.argv[3]))
        sys.stdout.flush()
        os._exit(0)  # skip native atexit handlers (see the NIXL/libibverbs note)
    code = _measure(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)
