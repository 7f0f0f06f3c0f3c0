"""A real Mooncake store on loopback: ``mooncake_master`` plus a segment-holder process.

:func:`spawn` starts the ``mooncake_master`` that ships in the Mooncake wheel (the console
script next to ``sys.executable``) on 127.0.0.1 with free ports, then a separate process
(``ectransfer/testing/servers/mooncake_holder.py``) that mounts ``segment_size`` bytes into it
and stays alive. Entries live in that holder's memory, so any number of client processes, which
contribute no memory, reach the same store through the returned URL and options; entries
cross a real process boundary over TCP.

Peers are found by ``P2PHANDSHAKE`` (no metadata service), or with ``http_metadata=True``
through the master's embedded HTTP metadata server. Both processes get
``MC_TCP_BIND_ADDRESS=127.0.0.1`` so they advertise loopback, not the LAN address.

:func:`restart_master` starts the master again on the same ports and waits until the holder has
mounted its segment into the new one (fault tests); :func:`kill_holder` crashes the holder;
:func:`rewrite_entry` replaces an entry's stored bytes (corruption tests).
The returned :class:`MooncakeServer` owns every process; ``stop()`` ends them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ectransfer.errors import BackendConnectionError, BackendUnavailableError
from ectransfer.testing.servers import ServerProcess, SpawnedServer, free_port

__all__ = ["MooncakeServer", "kill_holder", "master_binary", "restart_master", "rewrite_entry", "spawn", "start_holder"]

_READY_TIMEOUT_S = 60.0  # bounded, and generous: two busy cores can be slow to start a process
_ENV = {"MC_TCP_BIND_ADDRESS": "127.0.0.1"}


def master_binary() -> str:
    """Path of ``mooncake_master`` (the wheel's console script), or BackendUnavailableError."""
    beside = Path(sys.executable).parent / "mooncake_master"
    if beside.exists():
        return str(beside)
    found = shutil.which("mooncake_master")
    if found is None:
        raise BackendUnavailableError("mooncake_master is not installed: pip install 'ectransfer[mooncake-cpu]' "
                                      "(it ships in the mooncake-transfer-engine wheels)")
    return found


@dataclasses.dataclass
class MooncakeServer(SpawnedServer):
    """A spawned store: ``processes`` are ``[master, holder]`` (no holder without a segment)."""

    master_port: int = 0
    metrics_port: int = 0
    segment_size: int = 0
    workdir: Path = Path(".")

    @property
    def master(self) -> ServerProcess:
        return self.processes[0]

    @property
    def holder(self) -> ServerProcess:
        if len(self.processes) < 2:
            raise LookupError("this store was spawned without a segment holder (segment_size=0)")
        return self.processes[1]


def _metric(metrics_port: int, name: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    return None


def _wait_mounted(server: MooncakeServer, timeout_s: float) -> None:
    """Until the master reports the holder's segment mounted (the store can take writes)."""
    deadline = time.monotonic() + timeout_s
    while (_metric(server.metrics_port, "master_total_capacity_bytes") or 0) < server.segment_size:
        for p in server.processes:
            if not p.alive():
                raise BackendConnectionError(f"{p.argv[0]} exited with code {p.proc.returncode}\n{p.log_tail()}")
        if time.monotonic() > deadline:
            raise BackendConnectionError(f"the segment holder never mounted its segment into the master on port "
                                         f"{server.master_port} within {timeout_s:.0f} s\n{server.holder.log_tail()}")
        time.sleep(0.05)


def _start_master(argv: list[str], log: Path, rpc_port: int, metrics_port: int) -> ServerProcess:
    proc = ServerProcess(argv, log_path=log, env=_ENV)
    proc.wait_for_port(rpc_port, _READY_TIMEOUT_S)
    proc.wait_for_port(metrics_port, _READY_TIMEOUT_S)
    return proc


def start_holder(workdir: Path, master: str, segment_size: int, *, metadata_server: str = "P2PHANDSHAKE",
                 name: str = "holder") -> ServerProcess:
    """Start a segment holder for ``master`` and wait for its ready file."""
    ready = workdir / f"mooncake-{name}.ready"
    ready.unlink(missing_ok=True)
    # -I: the script's own directory (which holds this module, "mooncake.py") stays off sys.path
    argv = [sys.executable, "-I", str(Path(__file__).with_name("mooncake_holder.py")), "--master", master,
            "--segment-size", str(segment_size), "--ready-file", str(ready), "--metadata-server", metadata_server]
    proc = ServerProcess(argv, log_path=workdir / f"mooncake-{name}.log", env=_ENV)
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while not ready.exists():
        if not proc.alive() or time.monotonic() > deadline:
            tail = proc.log_tail()
            proc.stop()
            raise BackendConnectionError(f"the Mooncake segment holder did not mount its segment within "
                                         f"{_READY_TIMEOUT_S:.0f} s\n{tail}")
        time.sleep(0.05)
    return proc


def spawn(workdir: Path, *, segment_size: int = 1 << 30, http_metadata: bool = False) -> MooncakeServer:
    """Start a master and a holder of ``segment_size`` bytes; the URL and options reach them.

    ``segment_size=0`` starts no holder: a store without memory (every put fails with
    ``NO_AVAILABLE_HANDLE``), for capacity tests.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    rpc_port, metrics_port = free_port(), free_port()
    argv = [master_binary(), "--rpc_address=127.0.0.1", f"--rpc_port={rpc_port}", "--metrics_host=127.0.0.1",
            f"--metrics_port={metrics_port}"]
    if http_metadata:
        http_port = free_port()
        argv += ["--enable_http_metadata_server=true", "--http_metadata_server_host=127.0.0.1",
                 f"--http_metadata_server_port={http_port}"]
        metadata_server = f"http://127.0.0.1:{http_port}/metadata"
    else:
        argv += ["--enable_http_metadata_server=false"]
        metadata_server = "P2PHANDSHAKE"
    processes = [_start_master(argv, workdir / "mooncake-master.log", rpc_port, metrics_port)]
    try:
        if segment_size:
            processes.append(start_holder(workdir, f"127.0.0.1:{rpc_port}", segment_size,
                                          metadata_server=metadata_server))
    except BaseException:
        processes[0].stop()
        raise
    server = MooncakeServer(url=f"mooncake://127.0.0.1:{rpc_port}",
                            options={"metadata_server": metadata_server, "local_hostname": "127.0.0.1"},
                            processes=processes, master_port=rpc_port, metrics_port=metrics_port,
                            segment_size=segment_size, workdir=workdir)
    try:
        _wait_mounted(server, _READY_TIMEOUT_S)
    except BaseException:
        server.stop()
        raise
    (workdir / "mooncake-server.json").write_text(json.dumps({"url": server.url, "options": server.options}))
    return server


def restart_master(server: MooncakeServer) -> None:
    """Start the master again on its ports (it keeps nothing) and wait for the holder to remount."""
    old = server.master
    old.stop()
    server.processes[0] = _start_master(old.argv, old.log_path, server.master_port, server.metrics_port)
    _wait_mounted(server, _READY_TIMEOUT_S)


def kill_holder(server: MooncakeServer) -> None:
    """SIGKILL the segment holder: its entries are gone, the master notices after client_ttl."""
    server.holder.kill()


def rewrite_entry(backend: Any, key: str, mutate: Callable[[bytes], bytes]) -> None:
    """Replace the stored bytes of ``key`` (as ``backend``, a MooncakeBackend, stores it) with
    ``mutate(stored bytes)``: corruption tests.

    Uses a plain Mooncake client of its own. Mooncake ignores a zero-length write, so a
    mutation to ``b""`` cannot be stored: :class:`ValueError`.
    """
    import numpy as np

    from ectransfer.backends.mooncake.client import import_store

    mkey = backend.mooncake_key(key)
    cfg = backend.config
    store = import_store().MooncakeDistributedStore()
    rc = store.setup("127.0.0.1", cfg.metadata_server, 0, 0, "tcp", "", cfg.master)
    if rc != 0:
        raise BackendConnectionError(f"cannot join the Mooncake store at {cfg.master} (setup returned {rc})")
    try:
        size = store.get_size(mkey)
        if size < 0:
            raise BackendConnectionError(f"cannot read {mkey!r} (Mooncake error {size})")
        buf = np.zeros(max(size, 1), dtype=np.uint8)
        store.register_buffer(buf.ctypes.data, buf.nbytes)
        got = store.get_into(mkey, buf.ctypes.data, size)
        store.unregister_buffer(buf.ctypes.data)
        if got != size:
            raise BackendConnectionError(f"cannot read {mkey!r} (Mooncake error {got})")
        new = np.frombuffer(mutate(buf[:size].tobytes()), dtype=np.uint8).copy()
        if not new.nbytes:
            raise ValueError("Mooncake ignores zero-length writes: an entry cannot be rewritten to nothing")
        store.register_buffer(new.ctypes.data, new.nbytes)
        rc = store.upsert_from(mkey, new.ctypes.data, new.nbytes)
        store.unregister_buffer(new.ctypes.data)
        if rc != 0:
            raise BackendConnectionError(f"cannot rewrite {mkey!r} (Mooncake error {rc})")
    finally:
        store.close()
