"""A real S3-protocol server on loopback: ``moto_server`` in its own process.

``spawn(workdir)`` starts ``moto_server -H 127.0.0.1 -p PORT`` (the console script next to
``sys.executable``), waits until it listens, creates a bucket and returns ``s3://BUCKET/PREFIX``
with the options (``endpoint_url``, ``key``, ``secret``) any process can open it with. moto
keeps everything in memory: a restarted server is empty, so :func:`start_moto` +
:func:`create_bucket` are exported for fault tests that restart it on the same port.

moto answers in about 20 ms per request: fine for correctness, meaningless as an S3 benchmark.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

from ectransfer.errors import BackendConnectionError, BackendUnavailableError
from ectransfer.testing.servers import ServerProcess, SpawnedServer, free_port

__all__ = ["BUCKET", "PREFIX", "create_bucket", "moto_server_path", "spawn", "start_moto"]

BUCKET = "ectransfer"
PREFIX = "cache"
_KEY_ID = "ectransfer-test"


def moto_server_path() -> Path:
    """The ``moto_server`` console script of this interpreter's environment."""
    path = Path(sys.executable).parent / "moto_server"
    if not path.exists():
        raise BackendUnavailableError(f"moto_server not found at {path}: pip install 'moto[server]'")
    return path


def start_moto(workdir: Path, port: int | None = None, *, env: dict[str, str] | None = None) -> tuple[ServerProcess, int]:
    """Start moto on ``port`` (a free one if None, retried once on a clash); return it and its port."""
    argv0 = str(moto_server_path())
    for attempt in range(2):
        p = port or free_port()
        proc = ServerProcess([argv0, "-H", "127.0.0.1", "-p", str(p)], log_path=workdir / f"moto-{p}.log", env=env)
        try:
            proc.wait_for_port(p, timeout_s=30)  # Flask and moto import in 1-3 s on a busy machine
            return proc, p
        except BackendConnectionError:
            if attempt == 1 or port is not None:
                raise
    raise AssertionError("unreachable")


def create_bucket(endpoint_url: str, bucket: str, *, key: str, secret: str, timeout_s: float = 15.0) -> None:
    """Create ``bucket`` on the server (no region: moto refuses a us-east-1 location constraint)."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint_url, key=key, secret=secret, skip_instance_cache=True,
                           config_kwargs={"connect_timeout": timeout_s, "read_timeout": timeout_s})
    try:
        fs.mkdir(bucket)
    except FileExistsError:
        pass


def spawn(workdir: Path) -> SpawnedServer:
    """Start moto on a free loopback port with bucket :data:`BUCKET`; see the module docstring."""
    workdir.mkdir(parents=True, exist_ok=True)
    proc, port = start_moto(workdir)
    endpoint = f"http://127.0.0.1:{port}"
    # moto accepts any credentials; a random secret lets tests prove it never leaks.
    options = {"endpoint_url": endpoint, "key": _KEY_ID, "secret": secrets.token_hex(16)}
    try:
        create_bucket(endpoint, BUCKET, key=options["key"], secret=options["secret"])
    except BaseException:
        proc.stop()
        raise
    return SpawnedServer(url=f"s3://{BUCKET}/{PREFIX}", options=options, processes=[proc])
