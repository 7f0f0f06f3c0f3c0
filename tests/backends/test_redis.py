"""Redis backend against real redis-server processes on loopback (standalone, chunked, Cluster).

The conformance kit runs four times: standalone, standalone with tiny chunks (most items span
several chunk keys), a 3-node Cluster with small chunks, and standalone with the reader in
another process. Redis-specific behaviour follows: chunk damage and races, TTL, option
validation, TLS, Unix sockets, authentication, capacity, and the server dying or restarting.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ectransfer import (
    BackendConnectionError,
    CapacityError,
    ConfigError,
    CorruptEntryError,
    EntryNotFoundError,
    TransferTimeoutError,
    open_backend,
)
from ectransfer.backend import Backend
from ectransfer.backends.redis import RedisBackend, RedisConfig
from ectransfer.backends.redis.layout import Manifest
from ectransfer.testing import BackendTests, make_tensor, same_bits
from ectransfer.testing.servers import SpawnedServer, free_port
from ectransfer.testing.servers import redis as servers

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")

SECRET = "s3cret-pa55-xyzzy"


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpawnedServer]:
    with servers.spawn(tmp_path_factory.mktemp("redis")) as s:
        yield s


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpawnedServer]:
    with servers.spawn_cluster(tmp_path_factory.mktemp("redis-cluster")) as s:
        yield s


@pytest.fixture
def store(standalone: SpawnedServer) -> SpawnedServer:
    servers.flush(standalone)
    return standalone


@pytest.fixture
def opener(store: SpawnedServer) -> Iterator[Callable[..., RedisBackend]]:
    opened: list[RedisBackend] = []

    def _open(**opts: Any) -> RedisBackend:
        be = open_backend(store.url, **{**store.options, **opts})
        assert isinstance(be, RedisBackend)
        opened.append(be)
        return be

    yield _open
    for be in opened:
        be.close()


class _RedisCorrupt:
    def corrupt(self, backend: Backend[Any], key: str, mutate: Callable[[bytes], bytes]) -> None:
        servers.rewrite_entry(backend, key, mutate)


class TestRedisStandalone(_RedisCorrupt, BackendTests):
    @pytest.fixture
    def backend_factory(self, store: SpawnedServer) -> Callable[..., Backend[Any]]:
        return lambda **opts: open_backend(store.url, **{**store.options, **opts})


class TestRedisChunked(_RedisCorrupt, BackendTests):
    """chunk_bytes at its minimum: every item above 1 KiB is a manifest plus chunks."""

    @pytest.fixture
    def backend_factory(self, store: SpawnedServer) -> Callable[..., Backend[Any]]:
        return lambda **opts: open_backend(store.url, **{**store.options, "chunk_bytes": 1024, **opts})


class TestRedisCluster(_RedisCorrupt, BackendTests):
    @pytest.fixture
    def backend_factory(self, cluster: SpawnedServer) -> Callable[..., Backend[Any]]:
        servers.flush(cluster)
        return lambda **opts: open_backend(cluster.url, **{**cluster.options, "chunk_bytes": 4096, **opts})


@pytest.fixture(scope="module")
def remote_reader(standalone: SpawnedServer) -> Iterator[Any]:
    from ectransfer.testing.remote import RemoteBackend

    r = RemoteBackend.start(standalone.url, timeout_s=60, **{**standalone.options, "chunk_bytes": 2048})
    yield r
    r.close()


class TestRedisReadByAnotherProcess(_RedisCorrupt, BackendTests):
    @pytest.fixture
    def backend_factory(self, store: SpawnedServer) -> Callable[..., Backend[Any]]:
        return lambda **opts: open_backend(store.url, **{**store.options, "chunk_bytes": 2048, **opts})

    @pytest.fixture
    def reader(self, backend: Backend[Any], remote_reader: Any) -> Any:
        return remote_reader


# ------------------------------------------------------------------------- chunking
def _chunk_keys(be: RedisBackend, key: str) -> list[str]:
    skey = be._skey(key)
    manifest, _ = Manifest.decode(be.client.get(be.entry_key(skey)), key=skey)
    return be.key_layout.chunks(skey, manifest.version, manifest.chunks)


def _all_keys(be: RedisBackend) -> list[bytes]:
    return sorted(be.client.keys("*"))


def test_large_item_is_split_into_chunks(opener: Callable[..., RedisBackend]) -> None:
    be = opener(chunk_bytes=4096)
    t = make_tensor((50, 300), torch.bfloat16, seed=1)  # 30,000 payload bytes -> 8 chunks
    be.put("big", t)
    chunks = _chunk_keys(be, "big")
    assert len(chunks) == 8
    assert _all_keys(be) == sorted([be.entry_key("big").encode(), *(k.encode() for k in chunks)])
    assert [be.client.strlen(k) for k in chunks] == [4096] * 7 + [30_000 - 7 * 4096]
    assert same_bits(be.get("big"), t)
    out = torch.empty_like(t)
    assert same_bits(be.get_into("big", out), t)


def test_item_of_exactly_chunk_bytes_stays_whole(opener: Callable[..., RedisBackend]) -> None:
    probe = opener()
    probe.put("p", torch.zeros(1000, dtype=torch.uint8))
    header_len = probe.client.strlen(probe.entry_key("p")) - 1000
    be = opener(chunk_bytes=header_len + 3000)
    be.put("fits", torch.ones(3000, dtype=torch.uint8))
    be.put("over", torch.ones(3001, dtype=torch.uint8))
    over = _chunk_keys(be, "over")
    assert len(over) == 1, "the payload alone fits in one chunk: the header lives in the manifest"
    assert _all_keys(be) == sorted([b"ectransfer:{fits}", b"ectransfer:{over}", b"ectransfer:{p}", over[0].encode()])
    assert torch.equal(be.get("fits"), torch.ones(3000, dtype=torch.uint8))
    assert torch.equal(be.get("over"), torch.ones(3001, dtype=torch.uint8))


@pytest.mark.parametrize("call", ["get", "get_into", "get_many"])
def test_deleted_chunk_makes_the_item_absent_never_a_tensor(opener: Callable[..., RedisBackend], call: str) -> None:
    """A chunk evicted by maxmemory or deleted by hand: the item reads as absent and is removed."""
    be = opener(chunk_bytes=1024)
    be.put("k", make_tensor((40, 40), torch.float16, seed=2))
    be.put("other", make_tensor((40, 40), torch.float16, seed=3))
    be.client.delete(_chunk_keys(be, "k")[1])
    out = torch.empty((40, 40), dtype=torch.float16)
    read = {"get": lambda: be.get("k"), "get_into": lambda: be.get_into("k", out),
            "get_many": lambda: be.get_many(["other", "k"])}[call]
    with pytest.raises(EntryNotFoundError, match="chunk 1 of 4 is gone"):
        read()
    assert be.exists(["k", "other"]) == [False, True]
    assert all(b"{k}" not in k for k in _all_keys(be)), "what was left of the damaged item is removed"
    assert be.stats()["incomplete_removed"] == 1
    with pytest.raises(EntryNotFoundError):
        be.get("k")


def test_deleted_manifest_is_not_found(opener: Callable[..., RedisBackend]) -> None:
    be = opener(chunk_bytes=1024)
    be.put("k", make_tensor((40, 40), torch.float16, seed=2))
    be.client.delete(be.entry_key("k"))
    assert be.exists(["k"]) == [False]
    with pytest.raises(EntryNotFoundError):
        be.get("k")


@pytest.mark.parametrize("damage", ["flipped_byte", "short_chunk", "long_chunk", "swapped_chunks"])
def test_damaged_chunk_is_detected(opener: Callable[..., RedisBackend], damage: str) -> None:
    be = opener(chunk_bytes=1024)
    be.put("k", make_tensor((40, 40), torch.float16, seed=3))
    keys = _chunk_keys(be, "k")
    c0, c1 = be.client.get(keys[0]), be.client.get(keys[1])
    if damage == "flipped_byte":
        be.client.set(keys[2], bytes([be.client.get(keys[2])[0] ^ 1]) + be.client.get(keys[2])[1:])
    elif damage == "short_chunk":
        be.client.set(keys[0], c0[:-1])
    elif damage == "long_chunk":
        be.client.set(keys[0], c0 + b"\0")
    else:
        be.client.set(keys[0], c1)
        be.client.set(keys[1], c0)
    with pytest.raises(CorruptEntryError):
        be.get("k")


@pytest.mark.parametrize("damage", ["truncated_head", "lying_shape", "lying_count", "garbage_header"])
def test_damaged_manifest_is_detected(opener: Callable[..., RedisBackend], damage: str) -> None:
    be = opener(chunk_bytes=1024)
    be.put("k", make_tensor((40, 40), torch.float16, seed=4))
    key = be.entry_key("k")
    value = be.client.get(key)
    manifest, _ = Manifest.decode(value, key="k")
    if damage == "truncated_head":
        value = value[:40]
    elif damage == "lying_shape":
        value = value.replace(b"[40,40]", b"[20,80]")
    elif damage == "lying_count":
        value = Manifest(manifest.version, 3, manifest.payload_len, manifest.chunk_len, manifest.header).encode()
    else:
        value = value[:64] + b"\x10" + value[65:]
    be.client.set(key, value)
    with pytest.raises(CorruptEntryError):
        be.get("k")
    with pytest.raises(CorruptEntryError):
        be.get_into("k", torch.empty((40, 40), dtype=torch.float16))


def test_overwrite_retires_old_chunks_and_delete_removes_all(opener: Callable[..., RedisBackend]) -> None:
    be = opener(chunk_bytes=1024, timeout_s=7)
    be.put("k", make_tensor((40, 40), torch.float16, seed=5))
    old = _chunk_keys(be, "k")
    assert all(be.client.pttl(k) == -1 for k in old), "a finished write's chunks must not expire"
    be.put("k", make_tensor((30, 50), torch.float16, seed=6))
    new = _chunk_keys(be, "k")
    assert set(old).isdisjoint(new), "every version writes its own chunk keys"
    assert all(0 < be.client.pttl(k) <= 7000 for k in old), "displaced chunks expire after timeout_s"
    assert all(be.client.pttl(k) == -1 for k in new)
    be.put("k", torch.ones(4))  # a whole entry displaces a chunked one too
    assert all(0 < be.client.pttl(k) <= 7000 for k in new)
    assert torch.equal(be.get("k"), torch.ones(4))
    be.put("k2", make_tensor((40, 40), torch.float16, seed=7))
    be.delete(["k", "k2"])
    left = [k for k in _all_keys(be) if be.client.pttl(k) == -1]
    assert left == [], f"delete left keys behind: {left}"


def test_writer_dying_mid_write_leaves_only_expiring_chunks(opener: Callable[..., RedisBackend],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    be = opener(chunk_bytes=1024)

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt  # the process stops between the chunks and the manifest

    monkeypatch.setattr(be._client, "swap", crash)
    with pytest.raises(KeyboardInterrupt):
        be.put("k", make_tensor((40, 40), torch.float16, seed=8))
    monkeypatch.undo()
    keys = _all_keys(be)
    assert len(keys) == 4 and be.entry_key("k").encode() not in keys
    assert all(be.client.pttl(k) > 0 for k in keys), "orphaned chunks must carry an expiry"
    assert be.exists(["k"]) == [False]


def test_reader_racing_an_overwrite_gets_a_whole_version(opener: Callable[..., RedisBackend],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The old chunks vanish right after the reader fetched the manifest: it reads the new one."""
    reader, writer = opener(chunk_bytes=1024), opener(chunk_bytes=1024)
    old, new = make_tensor((40, 40), torch.float16, seed=9), make_tensor((20, 90), torch.float16, seed=10)
    writer.put("k", old)
    old_chunks = _chunk_keys(writer, "k")
    real_get = reader._client.get
    raced = []

    def get_then_replace(key: str) -> bytes | None:
        value = real_get(key)
        if not raced and key == reader.entry_key("k"):
            raced.append(key)
            writer.put("k", new)
            writer.client.delete(*old_chunks)  # as if the reader were slower than the grace period
        return value

    monkeypatch.setattr(reader._client, "get", get_then_replace)
    assert same_bits(reader.get("k"), new)
    assert raced
    assert reader.stats()["read_retries"] == 1 and writer.stats()["chunked_puts"] == 2


def test_reader_of_an_item_replaced_on_every_read_gives_up_cleanly(
        opener: Callable[..., RedisBackend], monkeypatch: pytest.MonkeyPatch) -> None:
    reader, writer = opener(chunk_bytes=1024), opener(chunk_bytes=1024)
    writer.put("k", make_tensor((40, 40), torch.float16, seed=11))
    real_get = reader._client.get
    seeds = iter(range(100, 200))

    def get_then_replace(key: str) -> bytes | None:
        value = real_get(key)
        if key == reader.entry_key("k"):
            doomed = _chunk_keys(writer, "k")
            writer.put("k", make_tensor((40, 40), torch.float16, seed=next(seeds)))
            writer.client.delete(*doomed)
        return value

    monkeypatch.setattr(reader._client, "get", get_then_replace)
    with pytest.raises(TransferTimeoutError, match="replaced"):
        reader.get("k")


def test_concurrent_overwrites_of_a_chunked_item(opener: Callable[..., RedisBackend]) -> None:
    writers = [opener(chunk_bytes=1024) for _ in range(2)]
    reader = opener(chunk_bytes=1024)
    shape = (64, 64)
    writers[0].put("hot", torch.full(shape, 1, dtype=torch.int16))
    errors: list[BaseException] = []
    seen: set[int] = set()
    stop = threading.Event()

    def write(be: RedisBackend, v: int) -> None:
        try:
            for _ in range(20):
                be.put("hot", torch.full(shape, v, dtype=torch.int16))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def read() -> None:
        try:
            while not stop.is_set():
                vals = torch.unique(reader.get("hot"))
                assert vals.numel() == 1, f"torn read: {vals.tolist()[:4]}"
                seen.add(int(vals[0]))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(be, v)) for be, v in zip(writers, (1, 2))]
    readers = [threading.Thread(target=read) for _ in range(2)]
    for th in readers + threads:
        th.start()
    for th in threads:
        th.join(60)
    stop.set()
    for th in readers:
        th.join(60)
    assert not errors, errors[0]
    assert seen
    assert int(torch.unique(reader.get("hot"))[0]) in (1, 2)


# ------------------------------------------------------------------------- batches
def test_batches_mix_small_large_and_chunked_entries(opener: Callable[..., RedisBackend]) -> None:
    be = opener(chunk_bytes=256 << 10)
    items = {"tiny": make_tensor((4,), torch.float32, seed=1),
             "small": make_tensor((100, 100), torch.bfloat16, seed=2),       # pipelined both ways
             "mid": make_tensor((300, 300), torch.bfloat16, seed=3),         # pipelined put, single get
             "chunked": make_tensor((700, 700), torch.bfloat16, seed=4),     # 980 KB: 4 chunks
             "large": make_tensor((1200, 600), torch.bfloat16, seed=5)}      # above the pipelined size
    be.put_many(items)
    keys = list(items)
    assert len(_chunk_keys(be, "chunked")) == 4
    for k, got in zip(keys, be.get_many(keys)):
        assert same_bits(got, items[k]), k
    outs = [torch.empty_like(items[k]) for k in keys]
    be.get_many_into(keys, outs)
    for k, o in zip(keys, outs):
        assert same_bits(o, items[k]), k
    with pytest.raises(EntryNotFoundError, match="absent"):
        be.get_many(["tiny", "absent", "large"])
    chunk = _chunk_keys(be, "chunked")[1]
    damaged = be.client.get(chunk)
    be.client.set(chunk, bytes([damaged[0] ^ 0xFF]) + damaged[1:])
    with pytest.raises(CorruptEntryError):
        be.get_many(["small", "chunked"])


def test_put_many_keeps_the_last_value_of_a_repeated_key(opener: Callable[..., RedisBackend]) -> None:
    be = opener(chunk_bytes=64 << 10)
    small, big = make_tensor((8, 8), torch.float16, seed=1), make_tensor((400, 400), torch.float16, seed=2)
    be.put_many([("k", small), ("k", big), ("j", big), ("j", small)])
    assert same_bits(be.get("k"), big) and same_bits(be.get("j"), small)
    be.put_many([("k", small)])  # a pipelined whole entry displaces a chunked one: its chunks retire
    assert same_bits(be.get("k"), small)
    assert [k for k in _all_keys(be) if b":c:" in k and be.client.pttl(k) == -1] == []


# ------------------------------------------------------------------------- TTL
def test_ttl_applies_to_every_key_of_an_item(opener: Callable[..., RedisBackend]) -> None:
    be = opener(chunk_bytes=1024, ttl_s=60, timeout_s=5)
    be.put("small", torch.ones(8))
    be.put("big", make_tensor((40, 40), torch.float16))
    assert 0 < be.client.pttl(be.entry_key("small")) <= 60_000
    manifest_ttl = be.client.pttl(be.entry_key("big"))
    chunk_ttls = [be.client.pttl(k) for k in _chunk_keys(be, "big")]
    assert 0 < manifest_ttl <= 60_000
    assert all(manifest_ttl < t <= 65_000 for t in chunk_ttls), "chunks must outlive their manifest"


def test_ttl_expiry_makes_entries_absent(opener: Callable[..., RedisBackend]) -> None:
    be = opener(chunk_bytes=1024, ttl_s=0.2)
    be.put("small", torch.ones(8))
    be.put("big", make_tensor((40, 40), torch.float16))
    deadline = time.monotonic() + 20
    while be.exists(["small", "big"]) != [False, False]:
        assert time.monotonic() < deadline, "entries with ttl_s=0.2 never expired"
        time.sleep(0.05)
    for key in ("small", "big"):
        with pytest.raises(EntryNotFoundError):
            be.get(key)


# ------------------------------------------------------------------------- cluster
def test_cluster_keeps_an_item_in_one_slot_and_spans_nodes(cluster: SpawnedServer) -> None:
    servers.flush(cluster)
    with open_backend(cluster.url, **cluster.options, chunk_bytes=1024, namespace="m1") as be:
        assert isinstance(be, RedisBackend)
        keys = [f"img-{i}" for i in range(40)]
        be.put_many({k: make_tensor((20, 30), torch.bfloat16, seed=i) for i, k in enumerate(keys)})
        slots = {be.client.keyslot(be.entry_key(be._skey(k))) for k in keys}
        nodes = {be.client.nodes_manager.get_node_from_slot(s).name for s in slots}
        assert len(nodes) == 3, "40 keys should land on every node of the cluster"
        for k in keys[:5]:
            entry = be.entry_key(be._skey(k))
            assert {be.client.keyslot(c) for c in _chunk_keys(be, k)} == {be.client.keyslot(entry)}
        assert be.exists(keys + ["absent"]) == [True] * 40 + [False]
        be.delete(keys[::2])
        assert be.exists(keys) == [i % 2 == 1 for i in range(40)]
        assert same_bits(be.get("img-3"), make_tensor((20, 30), torch.bfloat16, seed=3))


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


def test_key_prefix_separates_stores(opener: Callable[..., RedisBackend]) -> None:
    a, b = opener(key_prefix="svc-a"), opener(key_prefix="svc-b")
    a.put("k", torch.ones(2))
    assert b.exists(["k"]) == [False]
    assert a.client.exists("svc-a:{k}") == 1


# ------------------------------------------------------------------------- authentication
@pytest.fixture(scope="module")
def protected(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpawnedServer]:
    with servers.spawn(tmp_path_factory.mktemp("redis-auth"), password=SECRET) as s:
        yield s


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


def test_lru_eviction_never_yields_a_partial_item(tmp_path: Path) -> None:
    """allkeys-lru evicts chunks and manifests independently: a read is whole or absent."""
    with servers.spawn(tmp_path / "lru", args=["--maxmemory", "8mb", "--maxmemory-policy", "allkeys-lru",
                                               "--maxmemory-samples", "3"]) as srv:
        with open_backend(srv.url, chunk_bytes=256 << 10) as be:
            items = {f"img-{i}": make_tensor((512, 1024), torch.uint8, seed=i) for i in range(24)}  # 24 x 512 KiB
            for k, t in items.items():
                be.put(k, t)
            outcomes = {"whole": 0, "absent": 0}
            for k, t in items.items():
                try:
                    got = be.get(k)
                except EntryNotFoundError:
                    outcomes["absent"] += 1
                    assert be.exists([k]) == [False]
                    continue
                assert same_bits(got, t), f"{k}: a wrong tensor after eviction"
                outcomes["whole"] += 1
            assert outcomes["absent"] > 0, "8 MB cannot hold 12 MB of items: something must have been evicted"
            assert be.client.info("stats")["evicted_keys"] > 0


# ------------------------------------------------------------------------- server failures
def _in_thread(fn: Callable[[], Any], limit_s: float) -> BaseException | None:
    """Run ``fn``; fail the test if it does not end within ``limit_s`` (a hang); return its error."""
    box: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            box.append(exc)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(limit_s)
    assert not th.is_alive(), f"call still running after {limit_s} s: it hangs"
    return box[0] if box else None


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
                err = _in_thread(lambda k=key: be.get(k), limit_s=30)
                assert isinstance(err, BackendConnectionError), repr(err)
        finally:
            be.close()


def test_server_restart_reconnects(tmp_path: Path) -> None:
    with servers.spawn(tmp_path / "restart") as srv:
        with open_backend(srv.url, timeout_s=3) as be:
            be.put("k", torch.ones(4))
            srv.processes[0].kill()
            assert isinstance(_in_thread(lambda: be.exists(["k"]), 30), BackendConnectionError)
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
            assert isinstance(_in_thread(lambda: be.get("k"), 30), BackendConnectionError)
            servers.restart(srv)
            be.put("k", torch.full((4,), 2.0))
            assert torch.equal(be.get("k"), torch.full((4,), 2.0))


def test_nothing_listening_fails_at_open() -> None:
    port = free_port()
    err = _in_thread(lambda: open_backend(f"redis://127.0.0.1:{port}/0", timeout_s=2), 30)
    assert isinstance(err, BackendConnectionError) and f"127.0.0.1:{port}" in str(err)
