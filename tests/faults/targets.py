"""Fault targets: how to open, corrupt, stop, kill and restart each backend under test.

A target wraps one backend and (for network backends) the real server it talks to. The matrix
in test_matrix.py runs every fault against every target; a target that cannot express a fault
(no server to kill for fs) makes that cell skip with the reason, which the report shows.
"""

from __future__ import annotations

import importlib
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ectransfer import open_backend
from ectransfer.backend import Backend
from ectransfer.backends.fs import FsBackend
from ectransfer.backends.memory import MemoryBackend


class Target:
    """Base: a backend without a server (faults needing one are not applicable)."""

    name = "?"
    has_server = False
    #: several processes can write one store through ``url()`` + ``options()``; if not, why not
    shared_across_processes = True
    not_shared_reason = "in-process only"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    # --- store access
    def url(self) -> str:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {}

    def open(self, **opts: Any) -> Backend[Any]:
        return open_backend(self.url(), **{**self.options(), **opts})

    def corrupt(self, backend: Backend[Any], key: str, mutate: Callable[[bytes], bytes]) -> None:
        raise NotImplementedError

    # --- server faults (network backends override)
    def unreachable_url(self) -> tuple[str, dict[str, Any]]:
        """A URL + options naming a server that is not running."""
        raise NotImplementedError(f"{self.name} has no server")

    def kill_server(self) -> None:
        raise NotImplementedError(f"{self.name} has no server")

    def restart_server(self) -> None:
        raise NotImplementedError(f"{self.name} has no server")

    def proxied(self, proxy_port_for: Callable[[int], int]) -> tuple[str, dict[str, Any]]:
        """URL + options reaching the server through a proxy (``proxy_port_for(upstream_port)``)."""
        raise NotImplementedError(f"{self.name} has no server")

    def close(self) -> None:
        pass


class FsTarget(Target):
    name = "fs"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.root = workdir / "fs-store"

    def url(self) -> str:
        return f"file://{self.root}"

    def corrupt(self, backend: Backend[Any], key: str, mutate: Callable[[bytes], bytes]) -> None:
        assert isinstance(backend, FsBackend)
        p = backend.entry_path(backend._skey(key))
        p.write_bytes(mutate(p.read_bytes()))

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class MemoryTarget(Target):
    name = "memory"
    shared_across_processes = False

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.store = f"faults-{uuid.uuid4().hex}"

    def url(self) -> str:
        return f"memory://{self.store}"

    def corrupt(self, backend: Backend[Any], key: str, mutate: Callable[[bytes], bytes]) -> None:
        assert isinstance(backend, MemoryBackend)
        skey = backend._skey(key)
        with backend._store.lock:
            backend._store.entries[skey] = mutate(backend._store.entries[skey])


_ALL: dict[str, Callable[[Path], Target]] = {}


def all_targets() -> dict[str, Callable[[Path], Target]]:
    """name -> factory: fs and memory, plus ``TARGETS`` of every ``tests/faults/target_<backend>.py``.

    One module per network backend keeps each backend's server handling next to nothing else;
    a module whose backend is not installed here defines its targets anyway and lets
    ``Target.__init__`` skip with the reason. Collected on first call (not at import, so a
    target module can be imported on its own).
    """
    if not _ALL:
        found: dict[str, Callable[[Path], Target]] = {"fs": FsTarget, "memory": MemoryTarget}
        for path in sorted(Path(__file__).parent.glob("target_*.py")):
            module = importlib.import_module(f"{__package__}.{path.stem}")
            found.update(module.TARGETS)
        _ALL.update(found)
    return _ALL
