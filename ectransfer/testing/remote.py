"""Run a backend in a child process and drive it from this one (test harness).

The conformance kit's ``reader`` (or ``backend``) can be a :class:`RemoteBackend`, so entries
cross a real process boundary through the transport under test: the parent's calls travel
over a private pipe pair as msgpack messages (tensors as wire-codec bytes, never pickle) and
the child calls the real backend's primitives with the same storage keys. Errors come back as
the same :mod:`ectransfer.errors` class; a dead or silent child raises
:class:`~ectransfer.errors.BackendConnectionError` / :class:`~ectransfer.errors.TransferTimeoutError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import struct
import subprocess
import sys
import threading
from collections.abc import Mapping
from typing import Any, ClassVar

import msgpack
import torch

from ectransfer.backend import Backend, Capabilities
from ectransfer.codec import decode, encode
from ectransfer.config import BackendConfig
from ectransfer.errors import BackendConnectionError, ECTransferError, TransferTimeoutError
from ectransfer.framing import error_from_reply, error_reply

__all__ = ["RemoteBackend", "RemoteConfig"]

_LEN = struct.Struct("<I")


def _send(fd: int, obj: Any) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    view = memoryview(_LEN.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _recv_exact(fd: int, n: int, deadline_s: float | None) -> bytes:
    chunks, got = [], 0
    while got < n:
        if deadline_s is not None:
            ready, _, _ = select.select([fd], [], [], deadline_s)
            if not ready:
                raise TransferTimeoutError(f"remote backend did not answer within {deadline_s} s")
        chunk = os.read(fd, n - got)
        if not chunk:
            raise BackendConnectionError("remote backend process went away")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(fd: int, timeout_s: float | None) -> Any:
    (n,) = _LEN.unpack(_recv_exact(fd, 4, timeout_s))
    return msgpack.unpackb(_recv_exact(fd, n, timeout_s), raw=False)


@dataclasses.dataclass(frozen=True)
class RemoteConfig(BackendConfig):
    backend_name: ClassVar[str] = "remote"
    url: str = ""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    start_timeout_s: float = 60.0


class RemoteBackend(Backend[RemoteConfig]):
    """A backend living in a child process; see the module docstring."""

    name = "remote"
    config_class = RemoteConfig
    capabilities = Capabilities(False, False, False, False, False)

    def __init__(self, config: RemoteConfig) -> None:
        super().__init__(config)
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        options = {**config.options, "namespace": config.namespace}
        argv = [sys.executable, "-m", "ectransfer.testing.remote", str(to_child_r), str(from_child_w),
                json.dumps({"url": config.url, "options": options})]
        self.proc = subprocess.Popen(argv, pass_fds=(to_child_r, from_child_w), env={**os.environ, **config.env},
                                     stdin=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self._lock = threading.Lock()
        try:
            hello = _recv(self._from_child, config.start_timeout_s)
        except BaseException:
            self._kill()
            raise
        if "error" in hello:
            self._kill()
            raise self._error(hello)
        # Behave like the backend in the child for capability checks.
        self.capabilities = Capabilities(**hello["capabilities"])  # type: ignore[misc]

    @classmethod
    def start(cls, url: str, *, namespace: str = "", timeout_s: float = 60.0, env: Mapping[str, str] | None = None,
              **options: Any) -> RemoteBackend:
        """Open ``url`` with ``options`` in a child process."""
        return cls(RemoteConfig(url=url, options=options, namespace=namespace, timeout_s=timeout_s,
                                env=dict(env or {})))

    @staticmethod
    def _error(reply: dict[str, Any]) -> Exception:
        exc = error_from_reply(reply)
        assert exc is not None
        return exc

    def _call(self, op: str, **kw: Any) -> Any:
        with self._lock:
            if self.proc.poll() is not None:
                raise BackendConnectionError(f"remote backend process exited with code {self.proc.returncode}")
            try:
                _send(self._to_child, {"op": op, **kw})
                reply = _recv(self._from_child, self.config.timeout_s)
            except OSError as exc:  # killed after the poll above, before it was reaped
                raise BackendConnectionError(f"remote backend process is gone: {exc}") from exc
        if "error" in reply:
            raise self._error(reply)
        return reply.get("result")

    def _put(self, skey: str, tensor: torch.Tensor) -> None:
        self._call("put", key=skey, entry=encode(tensor).to_bytes())

    def _get(self, skey: str) -> torch.Tensor:
        return decode(self._call("get", key=skey), key=skey)

    def _exists(self, skeys: list[str]) -> list[bool]:
        return list(self._call("exists", keys=skeys))

    def _delete(self, skeys: list[str]) -> None:
        self._call("delete", keys=skeys)

    def _release(self, skeys: list[str]) -> None:
        self._call("release", keys=skeys)

    def call_backend(self, method: str, *args: Any) -> Any:
        """Call a msgpack-serialisable method of the child's backend (test helpers only)."""
        return self._call("method", name=method, args=list(args))

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass

    def _close(self) -> None:
        try:
            if self.proc.poll() is None:
                self._call("close")
                self.proc.wait(timeout=self.config.timeout_s)
        except (ECTransferError, subprocess.TimeoutExpired):
            pass
        finally:
            self._kill()

    def describe(self) -> str:
        return f"remote[{self.config.url.split('?')[0]}] pid={self.proc.pid}"


def _serve(rfd: int, wfd: int, spec: dict[str, Any]) -> None:
    from ectransfer.registry import open_backend

    torch.set_num_threads(1)
    try:
        backend = open_backend(spec["url"], **spec["options"])
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        _send(wfd, error_reply(exc))
        return
    _send(wfd, {"ok": True, "capabilities": dataclasses.asdict(type(backend).capabilities)})
    while True:
        try:
            msg = _recv(rfd, None)
        except BackendConnectionError:
            break
        op = msg["op"]
        try:
            if op == "put":
                backend._put(msg["key"], decode(msg["entry"], key=msg["key"]))
                result: Any = None
            elif op == "get":
                result = encode(backend._get(msg["key"])).to_bytes()
            elif op == "exists":
                result = backend._exists(msg["keys"])
            elif op == "delete":
                result = backend._delete(msg["keys"])
            elif op == "release":
                backend._release(msg["keys"])
                result = None
            elif op == "method":
                result = getattr(backend, msg["name"])(*msg["args"])
            elif op == "close":
                backend.close()
                _send(wfd, {"result": None})
                break
            else:
                raise ValueError(f"unknown op {op!r}")
            _send(wfd, {"result": result})
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the parent
            _send(wfd, error_reply(exc))


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]))
    sys.stdout.flush()
    # Skip interpreter teardown: some transports' native libraries crash in their atexit
    # handlers (see the NIXL/libibverbs note); the backend was closed above.
    os._exit(0)
