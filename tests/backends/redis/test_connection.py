"""Reaching the server: options and URLs, TLS, Unix socket, authentication, capacity, failures."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from ectransfer import BackendConnectionError, CapacityError, ConfigError, open_backend
from ectransfer.backends.redis import RedisBackend, RedisConfig
from ectransfer.testing import error_within, make_tensor, same_bits
from ectransfer.testing.servers import SpawnedServer, free_port
from ectransfer.testing.servers import redis as servers
from tests.backends.redis.helpers import SECRET, needs_redis_server

pytestmark = needs_redis_server


# ------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("url, options, match", [
    ("redis://127.0.0.1:99999/0", {}, "port"),
    ("redis://127.0.0.1:abc/0", {}, "port"),
    ("redis://127.0.0.1:6379/x", {}, "db"),
    ("redis://127.0.0.1:6379", {"db": -1}, "db"),
    ("redis://127.0.0.1:6379", {"db": "two"}, "db"),
    ("redis://127.0.0.1:6379", {"colour": "red"}, "colour"),
    ("redis://127.0.0.1:6379", {"chunk_bytes": "1GiB"}, "chunk_bytes"),
    ("redis://127.0.0.1:6379", {"chunk_bytes": 10}, "chunk_bytes"),
    ("redis://127.0.0.1:6379", {"ttl_s": 0}, "ttl_s"),
    ("redis://127.0.0.1:6379", {"timeout_s": 0}, "timeout_s"),
    ("redis://127.0.0.1:6379", {"key_prefix": "a{b}"}, "key_prefix"),
    ("redis://127.0.0.1:6379", {"max_connections": 0}, "max_connections"),
    ("redis://127.0.0.1:6379", {"cluster_nodes": "h:1"}, "cluster_nodes"),
    ("redis://127.0.0.1:6379", {"address_map": {"a:1": "b:2"}}, "address_map"),
    ("redis://127.0.0.1:6379", {"port": 6380}, "port"),
    ("redis+cluster://127.0.0.1:7000/1", {}, "db"),
    ("redis+cluster://127.0.0.1:7000", {"address_map": {"a:1": "b:x"}}, "address_map"),
    ("redis://a:1,b:2", {}, "redis\\+cluster"),
    ("redis://", {}, "host"),
    ("unix://relative.sock", {}, "unix"),
    ("unix:///tmp/r.sock", {"tls": True}, "unix_socket"),
    ("redis+nope://h:1", {}, "unsupported"),
])
def test_bad_url_or_option_names_it(url: str, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RedisBackend.config_from_url(url, options)


def test_url_forms() -> None:
    cfg = RedisConfig.from_url("redis://alice:p%40ss@db.example:6380/3", {})
    assert (cfg.host, cfg.port, cfg.db, cfg.username, cfg.password, cfg.tls, cfg.cluster) == \
        ("db.example", 6380, 3, "alice", "p@ss", False, False)
    assert "p@ss" not in repr(cfg) and "p@ss" not in cfg.location() and "p@ss" not in str(cfg.describe())
    cfg = RedisConfig.from_url("rediss://h", {"tls_verify": "false"})
    assert cfg.tls and cfg.port == 6379 and cfg.db == 0 and not cfg.tls_verify
    cfg = RedisConfig.from_url("unix:///run/redis.sock", {"db": "2"})
    assert (cfg.unix_socket, cfg.db) == ("/run/redis.sock", 2)
    cfg = RedisConfig.from_url("redis+cluster://a:7000,b:7001,[::1]:7002", {})
    assert cfg.cluster and cfg.seed_nodes() == [("a", 7000), ("b", 7001), ("::1", 7002)]
    cfg = RedisConfig.from_url("redis://a:7000", {"cluster": "true", "cluster_nodes": "b:7001"})
    assert cfg.cluster and cfg.location() == "redis+cluster://a:7000,b:7001"
    assert RedisConfig.from_url("rediss+cluster://a:1", {}).tls


def test_tls_options_are_validated(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked before connecting")
    with pytest.raises(ConfigError, match="tls_ca_file"):
        RedisConfig.from_url("rediss://h", {"tls_ca_file": str(tmp_path / "missing.pem")})
    with pytest.raises(ConfigError, match="tls_cert_file"):
        RedisConfig.from_url("rediss://h", {"tls_cert_file": str(ca)})
    with pytest.raises(ConfigError, match="tls_key_file"):
        RedisConfig.from_url("rediss://h", {"tls_cert_file": str(ca), "tls_key_file": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="needs TLS"):
        RedisConfig.from_url("redis://h", {"tls_ca_file": str(ca)})
    with pytest.raises(ConfigError, match="tls_verify"):
        RedisConfig.from_url("rediss://h", {"tls_verify": "sometimes"})
    cfg = RedisConfig.from_url("rediss://h", {"tls_ca_file": str(ca), "tls_cert_file": str(ca), "tls_key_file": str(ca)})
    assert cfg.tls_key_file == str(ca)


def test_tls_round_trip_and_unverifiable_server(tmp_path: Path) -> None:
    with servers.spawn(tmp_path / "tls", tls=True) as srv:
        assert srv.url.startswith("rediss://")
        t = make_tensor((300, 40), torch.bfloat16)
        with open_backend(srv.url, **srv.options, chunk_bytes=4096) as be:
            be.put("k", t)
            assert same_bits(be.get("k"), t)
        with pytest.raises(BackendConnectionError, match="connect"):
            open_backend(srv.url, timeout_s=5)  # no CA given: the self-signed certificate fails
        with open_backend(srv.url, tls_verify=False, timeout_s=5) as be:
            assert same_bits(be.get("k"), t)


def test_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    with servers.spawn(tmp_path / "unix", args=["--unixsocket", str(sock), "--unixsocketperm", "700"]):
        with open_backend(f"unix://{sock}?db=3") as be:
            be.put("k", torch.arange(10))
            assert torch.equal(be.get("k"), torch.arange(10))
            assert be.client.connection_pool.connection_kwargs["db"] == 3


def test_missing_database_is_a_config_error(store: SpawnedServer) -> None:
    with pytest.raises(ConfigError, match="'db'"):
        open_backend(store.url.rsplit("/", 1)[0] + "/99", **store.options)


# ------------------------------------------------------------------------- authentication
def _hostport(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]


@pytest.mark.parametrize("how", ["wrong_password_option", "wrong_password_url", "no_password"])
def test_failed_authentication_is_clear_and_never_shows_the_password(
        protected: SpawnedServer, caplog: pytest.LogCaptureFixture, how: str) -> None:
    wrong = "not-" + SECRET
    url, opts = {
        "wrong_password_option": (protected.url, {"password": wrong}),
        "wrong_password_url": (f"redis://:{wrong}@{_hostport(protected.url)}/0", {}),
        "no_password": (protected.url, {}),
    }[how]
    caplog.set_level(logging.DEBUG)
    with pytest.raises(BackendConnectionError, match="authentication failed") as info:
        open_backend(url, timeout_s=5, **opts)
    shown = f"{info.value} {info.value!r} {info.value.__cause__!r} {caplog.text}"
    assert wrong not in shown and SECRET not in shown


def test_right_password_works_and_stays_secret(protected: SpawnedServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for url, opts in ((protected.url, {"password": SECRET}), (f"redis://:{SECRET}@{_hostport(protected.url)}/0", {})):
        with open_backend(url, timeout_s=5, **opts) as be:
            be.put("k", torch.ones(3))
            assert torch.equal(be.get("k"), torch.ones(3))
            shown = f"{be!r} {be.describe()} {be.config!r} {be.config.describe()} {be.config.location()}"
            assert SECRET not in shown
    assert SECRET not in caplog.text


# ------------------------------------------------------------------------- capacity
def test_full_server_is_a_capacity_error(tmp_path: Path) -> None:
    with servers.spawn(tmp_path / "full", args=["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"]) as srv:
        with open_backend(srv.url, chunk_bytes=1 << 20) as be:
            with pytest.raises(CapacityError, match="out of memory"):
                for i in range(10):
                    be.put(f"k{i}", torch.zeros(1 << 20, dtype=torch.uint8))
            with pytest.raises(CapacityError):
                be.put("chunked", torch.zeros(3 << 20, dtype=torch.uint8))


@pytest.mark.parametrize("kind", ["standalone", "cluster"])
def test_server_killed_between_put_and_get(tmp_path: Path, kind: str) -> None:
    spawn = servers.spawn if kind == "standalone" else servers.spawn_cluster
    with spawn(tmp_path / kind) as srv:
        be = open_backend(srv.url, **srv.options, timeout_s=2, chunk_bytes=4096)
        try:
            be.put("small", torch.ones(4))
            be.put("big", make_tensor((100, 100), torch.float16))
            for p in srv.processes:
                p.kill()
            for key in ("small", "big"):
                err = error_within(lambda k=key: be.get(k), 30)
                assert isinstance(err, BackendConnectionError), repr(err)
        finally:
            be.close()


def test_server_restart_reconnects(tmp_path: Path) -> None:
    with servers.spawn(tmp_path / "restart") as srv:
        with open_backend(srv.url, timeout_s=3) as be:
            be.put("k", torch.ones(4))
            srv.processes[0].kill()
            assert isinstance(error_within(lambda: be.exists(["k"]), 30), BackendConnectionError)
            servers.restart(srv)
            assert be.exists(["k"]) == [False], "the first call after the restart reconnects (data was not saved)"
            be.put("k", torch.full((4,), 2.0))
            assert torch.equal(be.get("k"), torch.full((4,), 2.0))


def test_cluster_restart_reconnects(tmp_path: Path) -> None:
    with servers.spawn_cluster(tmp_path / "crestart") as srv:
        with open_backend(srv.url, timeout_s=3) as be:
            be.put("k", torch.ones(4))
            for p in srv.processes:
                p.kill()
            assert isinstance(error_within(lambda: be.get("k"), 30), BackendConnectionError)
            servers.restart(srv)
            be.put("k", torch.full((4,), 2.0))
            assert torch.equal(be.get("k"), torch.full((4,), 2.0))


def test_nothing_listening_fails_at_open() -> None:
    port = free_port()
    err = error_within(lambda: open_backend(f"redis://127.0.0.1:{port}/0", timeout_s=2), 30)
    assert isinstance(err, BackendConnectionError) and f"127.0.0.1:{port}" in str(err)
