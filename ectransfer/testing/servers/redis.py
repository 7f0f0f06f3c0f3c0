"""Real ``redis-server`` processes on loopback: standalone, TLS and a 3-node Cluster.

:func:`spawn` starts one server (``--save '' --appendonly no``, in the foreground, on a free
port of 127.0.0.1) and returns its ``redis://`` URL; :func:`spawn_cluster` starts ``nodes``
servers with ``--cluster-enabled yes``, joins them with ``redis-cli --cluster create`` and waits
until every node reports ``cluster_state:ok``. Both take a ``password`` (``requirepass``) for
authentication tests; :func:`spawn` also takes ``tls=True`` (a throw-away self-signed CA and
server certificate made with ``openssl``, served on ``--tls-port`` with ``--port 0``).

Every process is owned by the returned :class:`~ectransfer.testing.servers.SpawnedServer`:
:func:`restart` starts the same processes again on the same ports (fault tests), ``stop()``
ends them. Readiness failures raise :class:`~ectransfer.errors.BackendConnectionError` carrying
the server's log tail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ectransfer.errors import BackendConnectionError, BackendUnavailableError
from ectransfer.testing.servers import ServerProcess, SpawnedServer, free_port

__all__ = ["flush", "make_tls_files", "node_clients", "port_of", "restart", "rewrite_entry", "spawn", "spawn_cluster",
           "start_node"]

_READY_TIMEOUT_S = 15.0
_CLI_TIMEOUT_S = 30.0


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BackendUnavailableError(f"{name} is not installed (Debian: apt-get install redis-server)")
    return path


def _wait_ready(proc: ServerProcess, port: int, password: str | None, tls_dir: Path | None = None) -> None:
    """Wait until the server answers PING (a listening socket alone may still be loading)."""
    proc.wait_for_port(port, _READY_TIMEOUT_S)
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while True:
        out = _cli(port, password, ["PING"], tls_dir=tls_dir, check=False)
        if out.strip() == "PONG":
            return
        if not proc.alive() or time.monotonic() > deadline:
            tail = proc.log_tail()
            proc.stop()
            raise BackendConnectionError(f"redis-server on port {port} never answered PING ({out.strip()!r})\n{tail}")
        time.sleep(0.05)


def _cli(port: int, password: str | None, args: Sequence[str], *, tls_dir: Path | None = None,
         check: bool = True) -> str:
    argv = [_binary("redis-cli"), "-h", "127.0.0.1", "-p", str(port)]
    if tls_dir is not None:
        argv += ["--tls", "--cacert", str(tls_dir / "ca.crt")]
    # REDISCLI_AUTH keeps the password off the command line (and out of `ps`).
    env = {**os.environ, "REDISCLI_AUTH": password} if password else None
    res = subprocess.run(argv + list(args), capture_output=True, text=True, timeout=_CLI_TIMEOUT_S,
                         env=env, stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise BackendConnectionError(f"redis-cli {' '.join(args[:2])} failed: {res.stdout}{res.stderr}")
    return res.stdout + (res.stderr if res.returncode else "")


def start_node(workdir: Path, port: int, *, password: str | None = None, args: Sequence[str] = (),
               tls_dir: Path | None = None) -> ServerProcess:
    """Start one ``redis-server`` on ``port`` (data and log under ``workdir``) and wait for PING."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [_binary("redis-server"), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--dir", str(workdir), "--protected-mode", "no"]
    if tls_dir is not None:
        argv += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls_dir / "server.crt"),
                 "--tls-key-file", str(tls_dir / "server.key"), "--tls-ca-cert-file", str(tls_dir / "ca.crt"),
                 "--tls-auth-clients", "no"]
    else:
        argv += ["--port", str(port)]
    argv += list(args)
    proc = _start(argv, workdir, password)
    _wait_ready(proc, port, password, tls_dir)
    return proc


def _start(argv: list[str], workdir: Path, password: str | None) -> ServerProcess:
    # The password goes in a config file (mode 600), not on the command line, so it shows
    # neither in `ps` nor in the server log's argv.
    if password:
        conf = workdir / "auth.conf"
        conf.write_text(f"requirepass {password}\nmasterauth {password}\n")
        conf.chmod(0o600)
        argv = [argv[0], str(conf), *argv[1:]]
    return ServerProcess(argv, log_path=workdir / "redis.log")


def _restart_process(old: ServerProcess) -> ServerProcess:
    old.stop()
    return ServerProcess(old.argv, log_path=old.log_path)


def make_tls_files(directory: Path) -> Path:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost (``ca.crt``, ``server.crt/key``)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise BackendUnavailableError("openssl is not installed: cannot make TLS test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args: str) -> None:
        res = subprocess.run([openssl, *args], capture_output=True, text=True, timeout=_CLI_TIMEOUT_S, cwd=directory)
        if res.returncode != 0:
            raise BackendUnavailableError(f"openssl {args[0]} failed: {res.stderr.strip()}")

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ectransfer-test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key",
        "-out", "server.csr")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "san.ext", "-out", "server.crt")
    return directory


def spawn(workdir: Path, *, password: str | None = None, tls: bool = False,
          args: Sequence[str] = ()) -> SpawnedServer:
    """One standalone server. ``url`` has no password: it travels in ``options["password"]``."""
    tls_dir = make_tls_files(workdir / "tls") if tls else None
    for attempt in range(2):  # free_port() can race with another process: retry once
        port = free_port()
        try:
            proc = start_node(workdir / f"redis-{port}", port, password=password, args=args, tls_dir=tls_dir)
            break
        except BackendConnectionError:
            if attempt == 1:
                raise
    options: dict[str, Any] = {}
    if password:
        options["password"] = password
    if tls_dir is not None:
        options["tls_ca_file"] = str(tls_dir / "ca.crt")
    scheme = "rediss" if tls else "redis"
    return SpawnedServer(url=f"{scheme}://127.0.0.1:{port}/0", options=options, processes=[proc])


def spawn_cluster(workdir: Path, nodes: int = 3, *, password: str | None = None) -> SpawnedServer:
    """``nodes`` masters (no replicas) sharing the 16384 slots; ``url`` lists every node."""
    if nodes < 3:
        raise ValueError("redis-cli --cluster create needs at least 3 masters")
    procs: list[ServerProcess] = []
    ports: list[int] = []
    try:
        for _ in range(nodes):
            port, bus = free_port(), free_port()
            node_dir = workdir / f"cluster-{port}"
            procs.append(start_node(node_dir, port, password=password, args=[
                "--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-port", str(bus), "--cluster-node-timeout", "5000"]))
            ports.append(port)
        _cli(ports[0], password, ["--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                                  "--cluster-replicas", "0", "--cluster-yes"])
        _wait_cluster_ok(procs, ports, password)
    except BaseException:
        for p in procs:
            p.stop()
        raise
    options: dict[str, Any] = {"password": password} if password else {}
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    return SpawnedServer(url=url, options=options, processes=procs)


def _wait_cluster_ok(procs: list[ServerProcess], ports: list[int], password: str | None) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S * 2
    for proc, port in zip(procs, ports):
        while "cluster_state:ok" not in _cli(port, password, ["CLUSTER", "INFO"], check=False):
            if not proc.alive() or time.monotonic() > deadline:
                raise BackendConnectionError(f"cluster node {port} never reached cluster_state:ok\n{proc.log_tail()}")
            time.sleep(0.1)


def port_of(proc: ServerProcess) -> int:
    """The port a server process of this module listens on."""
    argv = proc.argv
    flag = "--tls-port" if "--tls-port" in argv else "--port"
    return int(argv[argv.index(flag) + 1])


def node_clients(spawned: SpawnedServer) -> list[Any]:
    """One plain redis-py client per server process (to inspect, flush or damage the store)."""
    import redis

    kw: dict[str, Any] = {"password": spawned.options.get("password"), "socket_timeout": _CLI_TIMEOUT_S}
    if "tls_ca_file" in spawned.options:
        kw.update(ssl=True, ssl_ca_certs=spawned.options["tls_ca_file"])
    return [redis.Redis(host="127.0.0.1", port=port_of(p), **kw) for p in spawned.processes]


def flush(spawned: SpawnedServer) -> None:
    """Empty every node (FLUSHALL): each test starts from an empty store."""
    for client in node_clients(spawned):
        with client:
            client.flushall()


def rewrite_entry(backend: Any, key: str, mutate: Callable[[bytes], bytes]) -> None:
    """Replace the stored entry of ``key`` with ``mutate(its wire-codec bytes)`` (corruption tests).

    A chunked entry is reassembled first (manifest header + chunks); the mutated bytes are
    written back as one whole value under the entry key.
    """
    from ectransfer.backends.redis.layout import Manifest, version_of

    skey = backend._skey(key)
    client = backend.client
    entry_key = backend.entry_key(skey)
    value = client.get(entry_key)
    if value is None:
        raise KeyError(key)
    if version_of(value) is not None:
        manifest, _ = Manifest.decode(value, key=skey)
        chunks = [client.get(k) for k in backend.key_layout.chunks(skey, manifest.version, manifest.chunks)]
        value = manifest.header + b"".join(chunks)
    client.set(entry_key, mutate(value))


def restart(spawned: SpawnedServer, *, password: str | None = None) -> None:
    """Stop (if running) and start again every process of ``spawned``, same ports, same config.

    Data is not kept (``--save ''``); a cluster keeps its slot map in ``nodes.conf`` and is
    waited for until ``cluster_state:ok`` again.
    """
    password = password if password is not None else spawned.options.get("password")
    fresh = [_restart_process(p) for p in spawned.processes]
    spawned.processes[:] = fresh
    ports = [port_of(p) for p in fresh]
    tls_dir = None
    if "tls_ca_file" in spawned.options:
        tls_dir = Path(spawned.options["tls_ca_file"]).parent
    for proc, port in zip(fresh, ports):
        _wait_ready(proc, port, password, tls_dir)
    if "--cluster-enabled" in fresh[0].argv:
        _wait_cluster_ok(fresh, ports, password)
