"""The one NIXL agent of a backend: created on first use, transfers bounded by a deadline.

Everything that touches ``nixl._api`` is here, so the rest of the package is plain Python.
NIXL's own errors (``nixlBind`` exceptions, ``"ERR"`` states) become
:class:`~ectransfer.errors.BackendConnectionError`; a transfer still in progress at its
deadline is aborted and becomes :class:`~ectransfer.errors.TransferTimeoutError`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from ectransfer.errors import BackendConnectionError, BackendUnavailableError, TransferTimeoutError

__all__ = ["PROGRESS_DELAY_US", "Agent", "import_nixl", "new_nixl_agent"]

log = logging.getLogger(__name__)

Region = tuple[int, int, int]  # (address, length, device id)

# Measured on loopback (docs/backends/nixl.md): sleeping between polls from the first one
# halved throughput on a busy 2-core host, where a sleeping thread waits long to run again.
_SPIN_S = 0.05

#: microseconds NIXL's UCX progress thread may sleep in poll() between wake-ups (it wakes at
#: once on worker events). NIXL's Python API hard-codes 0, which makes that thread spin: one
#: full core per agent, even idle (measured: 1.0 CPU-second per second per agent).
PROGRESS_DELAY_US = 1000

_create_lock = threading.Lock()


def import_nixl() -> Any:
    """The ``nixl._api`` module, or BackendUnavailableError naming the extra."""
    try:
        from nixl import _api
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the nixl package is not importable ({exc}); install it with: pip install 'ectransfer[nixl]'"
        ) from exc
    return _api


class _DelayingBindings:
    """NIXL's binding module, except that agents it creates get :data:`PROGRESS_DELAY_US`."""

    def __init__(self, bindings: Any) -> None:
        self._bindings = bindings

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bindings, name)

    def nixlAgent(self, name: str, config: Any) -> Any:  # the binding's name
        config.pthrDelay = max(int(config.pthrDelay), PROGRESS_DELAY_US)
        return self._bindings.nixlAgent(name, config)


def new_nixl_agent(name: str, plugin: str = "UCX", *, progress: bool, **options: Any) -> Any:
    """A ``nixl_agent`` with one plugin; its progress thread (``progress``) waits, not spins.

    ``options`` go to ``nixl_agent_config``. Also what the raw NIXL baseline of the bench uses,
    so both sides of that comparison run the same agent configuration.
    """
    api = import_nixl()
    config = api.nixl_agent_config(enable_prog_thread=progress, enable_listen_thread=False, backends=[plugin],
                                   **options)
    return _create(api, name, config, progress)


def _create(api: Any, name: str, config: Any, progress: bool) -> Any:
    """``api.nixl_agent(name, config)``; a progress thread, if any, waits instead of spinning.

    ``nixl_agent`` builds the C++ agent config itself and sets ``pthrDelay = 0``; the only
    way to a different value is its module-level ``nixlBind``, swapped here for the length of
    the constructor (a proxy that forwards everything else). A NIXL without that attribute or
    field gets its own default.
    """
    bindings = getattr(api, "nixlBind", None)
    if not progress or bindings is None or not hasattr(bindings, "nixlAgentConfig") \
            or not hasattr(bindings.nixlAgentConfig(), "pthrDelay"):
        return api.nixl_agent(name, config)
    with _create_lock:
        api.nixlBind = _DelayingBindings(bindings)
        try:
            return api.nixl_agent(name, config)
        finally:
            api.nixlBind = bindings


class Agent:
    """A NIXL agent with one transport plugin (``UCX`` by default).

    ``progress``: whether the agent runs NIXL's progress thread. A serving agent (the
    producer's) needs it: UCX only answers a consumer's connection set-up while its worker
    progresses. An agent that only initiates READs does not (checking a transfer's state
    progresses its worker; READ times with and without the thread measured alike,
    benchmarks/nixl_datapath.py).
    """

    def __init__(self, role: str, plugin: str, *, progress: bool = True) -> None:
        api = import_nixl()
        self.name = f"ectransfer-{role}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # The backend's primitives run on a thread pool: NIXL's reader-writer mode keeps the
        # data path concurrent and serialises metadata changes (STRICT measured slower). NIXL
        # releases before the mode existed only had one mode, used as it comes.
        sync = getattr(api, "nixl_thread_sync_t", None)
        extra = {"sync_mode": sync.NIXL_THREAD_SYNC_RW} if sync is not None else {}
        try:
            self._agent = new_nixl_agent(self.name, plugin, progress=progress, **extra)
        except Exception as exc:
            raise BackendUnavailableError(f"cannot create a NIXL agent with plugin {plugin!r}: {exc}") from exc
        if plugin not in self._agent.backends:
            raise BackendUnavailableError(
                f"NIXL plugin {plugin!r} is not available here; plugins: {', '.join(self._agent.plugin_list)}"
            )
        self._remote: set[str] = set()
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- memory
    def register(self, regions: Sequence[Region], mem_type: str) -> Any:
        try:
            return self._agent.register_memory([(a, n, d, "") for a, n, d in regions], mem_type)
        except Exception as exc:
            raise BackendConnectionError(f"NIXL could not register {mem_type} memory: {exc}") from exc

    def deregister(self, registration: Any) -> None:
        try:
            self._agent.deregister_memory(registration)
        except Exception as exc:  # noqa: BLE001 - teardown must go on
            log.warning("NIXL deregistration failed: %s", exc)

    # ----------------------------------------------------------------- peers
    def metadata(self) -> bytes:
        md: bytes = self._agent.get_agent_metadata()
        return md

    def knows(self, agent_name: str) -> bool:
        with self._lock:
            return agent_name in self._remote

    def add_remote(self, metadata: bytes, replaces: str | None = None) -> str:
        try:
            name = self._agent.add_remote_agent(metadata)
        except Exception as exc:
            raise BackendConnectionError(f"NIXL rejected a producer's agent metadata: {exc}") from exc
        name = name.decode() if isinstance(name, bytes) else str(name)
        with self._lock:
            self._remote.add(name)
            stale = replaces if replaces and replaces != name and replaces in self._remote else None
            if stale:
                self._remote.discard(stale)
        if stale:
            self._forget(stale)
        return name

    def _forget(self, name: str) -> None:
        try:
            self._agent.remove_remote_agent(name)
        except Exception as exc:  # noqa: BLE001 - the peer is gone anyway
            log.debug("removing NIXL agent %s failed: %s", name, exc)

    # ----------------------------------------------------------------- transfers
    def read(self, peer: str, local: Sequence[Region], remote: Sequence[Region], *, local_mem: str,
             remote_mem: str, deadline: float) -> None:
        """One READ of every ``remote[i]`` into ``local[i]``; returns once all bytes landed.

        The caller has registered ``local``. Raises BackendConnectionError if NIXL reports an
        error (the producer died), TransferTimeoutError at ``deadline`` (monotonic).
        """
        if not local:
            return
        a = self._agent
        try:
            handle = a.initialize_xfer("READ", a.get_xfer_descs(list(local), local_mem),
                                       a.get_xfer_descs(list(remote), remote_mem), peer)
            state = a.transfer(handle)
        except Exception as exc:
            raise BackendConnectionError(f"NIXL READ from {peer} could not start: {exc}") from exc
        spin_until = time.monotonic() + _SPIN_S
        while state == "PROC":
            now = time.monotonic()
            if now > deadline:
                self._abort(handle)
                raise TransferTimeoutError(f"NIXL READ from {peer} did not complete before its deadline")
            # Poll hot (yielding the GIL) while a transfer of ordinary size can still be
            # running; past that, poll gently so a long transfer does not hold a core.
            time.sleep(0 if now < spin_until else 2e-4)
            try:
                state = a.check_xfer_state(handle)
            except Exception as exc:  # noqa: BLE001
                state = "ERR"
                log.debug("check_xfer_state failed: %s", exc)
        self._release(handle)
        if state != "DONE":
            raise BackendConnectionError(f"NIXL READ from {peer} failed (state {state}); the producer may have exited")

    def _release(self, handle: Any) -> None:
        try:
            self._agent.release_xfer_handle(handle)
        except Exception as exc:  # noqa: BLE001
            log.debug("release_xfer_handle failed: %s", exc)

    def _abort(self, handle: Any) -> None:
        # Releasing an unfinished request asks the plugin to abort it; NIXL may refuse, in
        # which case the handle stays in its leak list and is released with the agent.
        self._release(handle)

    def close(self) -> None:
        with self._lock:
            remote, self._remote = list(self._remote), set()
        for name in remote:
            self._forget(name)
