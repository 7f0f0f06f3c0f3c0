"""Mooncake clients: importing Mooncake, joining a store, sharing one client per configuration.

A Mooncake client (``MooncakeDistributedStore`` after ``setup()``) is a transfer engine with its
own RPC port and threads, and its ``setup()`` and ``close()`` hold the GIL while they run
(``close()`` for about a second: it joins Mooncake's heartbeat thread). So backends opened in
one process with the same store and transport settings share one client, counted by
:func:`join` and :func:`release`; the last release closes it. Each backend still registers
its own staging buffer with it and runs its calls on its own threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

from ectransfer.backends.mooncake.codes import error_for
from ectransfer.backends.mooncake.config import MooncakeConfig
from ectransfer.errors import BackendConnectionError, BackendUnavailableError

__all__ = ["SharedClient", "import_store", "join", "local_address", "release"]

_SETUP_RETRIES = 2


def import_store() -> Any:
    """``mooncake.store``, or :class:`BackendUnavailableError` saying what to install."""
    try:
        from mooncake import store
    except ImportError as exc:
        raise BackendUnavailableError(why_unavailable(exc)) from exc
    return store


def why_unavailable(exc: ImportError) -> str:
    """What to install, given the error importing ``mooncake.store`` raised."""
    text = str(exc)
    if "libibverbs" in text:
        return (f"Mooncake cannot load libibverbs.so.1 ({text}): install the Debian/Ubuntu package libibverbs1 "
                "(apt-get install libibverbs1)")
    if "libcuda" in text:
        return (f"the CUDA build of Mooncake (mooncake-transfer-engine) finds no CUDA here ({text}); on a CPU host "
                "pip install 'ectransfer[mooncake-cpu]' (mooncake-transfer-engine-non-cuda) instead")
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "mooncake":
        return ("Mooncake is not installed: pip install 'ectransfer[mooncake-cpu]' on CPU hosts, "
                "'ectransfer[mooncake]' (the CUDA build) on GPU hosts")
    return f"Mooncake cannot be imported ({text})"


def local_address(host: str, port: int) -> str:
    """The address peers should reach this host at: ``MC_TCP_BIND_ADDRESS`` (what Mooncake
    advertises) if set, else this host's address on the route to ``host``."""
    bind = os.environ.get("MC_TCP_BIND_ADDRESS")
    if bind:
        return bind
    try:
        family, _, _, _, addr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(addr)  # UDP: picks the route, sends nothing
            return str(s.getsockname()[0])
    except OSError:
        return socket.gethostname()


@contextlib.contextmanager
def native_deadlines(timeout_s: float) -> Iterator[None]:
    """Mooncake's own deadlines for a client being set up, unless the user set them.

    ``setup()`` holds the GIL, so no worker thread can bound it: its master RPCs
    (``MC_RPC_TIMEOUT_MS``, ``MC_RPC_CONNECT_TIMEOUT_MS``) and its retries
    (``MC_STORE_CLIENT_SETUP_RETRIES``) are sized so that all of it fits ``timeout_s``. The
    client keeps that RPC deadline, so a call abandoned at ``timeout_s`` ends soon after. The
    variables are removed again as soon as ``setup()`` returns (no other Python thread runs
    meanwhile: setup holds the GIL).
    """
    per_rpc = str(max(1000, int(timeout_s * 1000 / _SETUP_RETRIES)))
    wanted = {"MC_RPC_TIMEOUT_MS": per_rpc, "MC_RPC_CONNECT_TIMEOUT_MS": per_rpc,
              "MC_STORE_CLIENT_SETUP_RETRIES": str(_SETUP_RETRIES)}
    added = [k for k in wanted if k not in os.environ]
    for k in added:
        os.environ[k] = wanted[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@dataclasses.dataclass(eq=False)
class SharedClient:
    """One joined Mooncake client and how many backends use it."""

    key: tuple[Any, ...]
    store: Any
    local_hostname: str
    refs: int = 1


_LOCK = threading.Lock()
_CLIENTS: dict[tuple[Any, ...], SharedClient] = {}


def join(cfg: MooncakeConfig) -> SharedClient:
    """A client of the store ``cfg`` names: the shared one, or a new one that joined it."""
    host, _, port = cfg.master.rpartition(":")
    local = cfg.local_hostname or local_address(host, int(port))
    key = (cfg.master, cfg.metadata_server, cfg.protocol, cfg.device_name, local, cfg.global_segment_size,
           cfg.timeout_s)
    with _LOCK:
        shared = _CLIENTS.get(key)
        if shared is not None:
            shared.refs += 1
            return shared
        store_mod = import_store()
        try:  # fail fast and clearly when nothing listens (setup() would retry for 90 s)
            socket.create_connection((host.strip("[]"), int(port)), timeout=min(cfg.timeout_s, 10.0)).close()
        except OSError as exc:
            raise BackendConnectionError(f"mooncake backend: cannot reach mooncake_master at {cfg.master}: "
                                         f"{exc.strerror or exc}") from None
        store = store_mod.MooncakeDistributedStore()
        with native_deadlines(cfg.timeout_s):
            # Mooncake's own local buffer serves only its bytes API (put/get), which the
            # backend never calls: its registered staging buffer carries the data.
            rc = int(store.setup(local, cfg.metadata_server, cfg.global_segment_size, 0, cfg.protocol,
                                 cfg.device_name, cfg.master))
        if rc != 0:
            raise error_for(rc, f"setup (joining the store at {cfg.master} as {local}, metadata_server="
                                f"{cfg.metadata_server.split('?')[0]}, protocol={cfg.protocol}); see the Mooncake log",
                            as_class=BackendConnectionError)
        shared = _CLIENTS[key] = SharedClient(key, store, local)
        return shared


def release(shared: SharedClient) -> None:
    """One backend is done with ``shared``; the last one closes the client."""
    with _LOCK:
        shared.refs -= 1
        if shared.refs > 0:
            return
        if _CLIENTS.get(shared.key) is shared:
            del _CLIENTS[shared.key]
    shared.store.close()
