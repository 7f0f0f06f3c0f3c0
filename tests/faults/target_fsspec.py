"""Fault target ``s3``: the fsspec backend against a real ``moto_server`` process on loopback."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ectransfer.backend import Backend
from ectransfer.testing.servers import ServerProcess, free_port
from tests.faults.targets import Target

BUCKET = "faults"


class S3Target(Target):
    name = "s3"
    has_server = True

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        pytest.importorskip("s3fs", reason="the s3 target needs s3fs: pip install 'ectransfer[s3]'")
        from ectransfer.testing.servers.fsspec import create_bucket, moto_server_path, start_moto

        try:
            moto_server_path()
        except Exception as exc:  # noqa: BLE001 - the reason is shown in the skip
            pytest.skip(str(exc))
        self._start, self._create_bucket = start_moto, create_bucket
        self._creds = {"key": "faults", "secret": secrets.token_hex(16)}
        self.proc: ServerProcess | None = None
        self.port = 0
        self._boot(None)
        import s3fs

        self.raw = s3fs.S3FileSystem(endpoint_url=self._endpoint(self.port), skip_instance_cache=True,
                                     use_listings_cache=False, **self._creds)

    def _boot(self, port: int | None) -> None:
        self.proc, self.port = self._start(self.workdir, port)
        try:
            self._create_bucket(self._endpoint(self.port), BUCKET, **self._creds)
        except BaseException:
            self.proc.stop()  # the fixture cannot close a target that failed to build
            raise

    @staticmethod
    def _endpoint(port: int) -> str:
        return f"http://127.0.0.1:{port}"

    def url(self) -> str:
        return f"s3://{BUCKET}/matrix"

    def options(self) -> dict[str, Any]:
        return {"endpoint_url": self._endpoint(self.port), **self._creds}

    def corrupt(self, backend: Backend[Any], key: str, mutate: Callable[[bytes], bytes]) -> None:
        path = backend.entry_path(backend._skey(key))  # type: ignore[attr-defined]
        self.raw.pipe_file(path, mutate(self.raw.cat_file(path)))

    def unreachable_url(self) -> tuple[str, dict[str, Any]]:
        return self.url(), {**self.options(), "endpoint_url": self._endpoint(free_port())}

    def kill_server(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.stop()

    def restart_server(self) -> None:
        # moto keeps data in memory: the restarted server is empty, so the bucket is made again
        # and the matrix expects reconnection only.
        self._boot(self.port)

    def proxied(self, proxy_port_for: Callable[[int], int]) -> tuple[str, dict[str, Any]]:
        return self.url(), {**self.options(), "endpoint_url": self._endpoint(proxy_port_for(self.port))}

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stop()


TARGETS: dict[str, Callable[[Path], Target]] = {"s3": S3Target}
