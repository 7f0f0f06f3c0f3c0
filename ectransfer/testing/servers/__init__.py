"""Real servers on loopback, for tests and ``ectransfer-bench --spawn``.

Each backend that needs a server has a module here, ``ectransfer.testing.servers.<backend>``,
with a function ``spawn(workdir: pathlib.Path) -> SpawnedServer`` that starts it on free
loopback ports and returns the URL and options a backend needs to reach it. The process is
owned by the caller (never daemonized) and stopped by :meth:`SpawnedServer.stop`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ectransfer.errors import BackendConnectionError, BackendUnavailableError

__all__ = ["ServerProcess", "SpawnedServer", "free_port", "spawner", "wait_for_port"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (start the server soon; retry once on a clash)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, *, timeout_s: float = 15.0, proc: subprocess.Popen[bytes] | None = None,
                  host: str = "127.0.0.1") -> None:
    """Block until ``host:port`` accepts a connection; raise after ``timeout_s`` or if ``proc`` died."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise BackendConnectionError(f"server process exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BackendConnectionError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s")
        time.sleep(0.05)


class ServerProcess:
    """One server process we own: started with ``argv``, logged to a file, stopped by PID."""

    def __init__(self, argv: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})}, cwd=cwd,
            )
        except OSError:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_for_port(self, port: int, timeout_s: float = 15.0) -> None:
        try:
            wait_for_port(port, timeout_s=timeout_s, proc=self.proc)
        except BackendConnectionError as exc:
            self.stop()
            raise BackendConnectionError(f"{exc}: {' '.join(self.argv[:1])}\n{self.log_tail()}") from None

    def kill(self) -> None:
        """SIGKILL (a crash, for fault tests)."""
        if self.alive():
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout_s)
        self._log.close()


@dataclasses.dataclass
class SpawnedServer:
    """A started server: how to reach it (``url`` + ``options``) and how to stop it."""

    url: str
    options: dict[str, Any]
    processes: list[ServerProcess]
    cleanup: list[Callable[[], None]] = dataclasses.field(default_factory=list)

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.stop()
        for fn in self.cleanup:
            fn()

    def __enter__(self) -> SpawnedServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def spawner(backend: str) -> Callable[[Path], SpawnedServer] | None:
    """The ``spawn`` function for ``backend``, or None if it needs no server or has none here."""
    try:
        module = importlib.import_module(f"{__name__}.{backend}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.{backend}":
            return None
        raise BackendUnavailableError(f"cannot load the {backend} test server helper: {exc}") from exc
    fn: Callable[[Path], SpawnedServer] = module.spawn
    return fn
