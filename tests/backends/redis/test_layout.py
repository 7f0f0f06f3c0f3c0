"""Where items live in Redis: chunks and versions, damage, racing writers, batches, TTL, Cluster slots."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ectransfer import CapacityError, CorruptEntryError, EntryNotFoundError, TransferTimeoutError, open_backend
from ectransfer.backends.redis import RedisBackend
from ectransfer.backends.redis.layout import Manifest
from ectransfer.testing import make_tensor, same_bits
from ectransfer.testing.servers import SpawnedServer
from ectransfer.testing.servers import redis as servers
from tests.backends.redis.helpers import all_keys, chunk_keys, needs_redis_server

pytestmark = needs_redis_server


def test_large_item_is_split_into_chunks(opener: Callable[..., RedisBackend]) -> None:
    be = opener(chunk_bytes=4096)
    t = make_tensor((50, 300), torch.bfloat16, seed=1)  # 30,000 payload bytes -> 8 chunks
    be.put("big", t)
    chunks = chunk_keys(be, "big")
    assert len(chunks) == 8
    assert all_keys(be) == sorted([be.entry_key("big").encode(), *(k.encode() for k in chunks)])
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
    over = chunk_keys(be, "over")
    assert len(over) == 1, "the payload alone fits in one chunk: the header lives in the manifest"
    assert all_keys(be) == sorted([b"ectransfer:{fits}", b"ectransfer:{over}", b"ectransfer:{p}", over[0].encode()])
    assert torch.equal(be.get("fits"), torch.ones(3000, dtype=torch.uint8))
    assert torch.equal(be.get("over"), torch.ones(3001, dtype=torch.uint8))


@pytest.mark.parametrize("call", ["get", "get_into", "get_many"])
def test_deleted_chunk_makes_the_item_absent_never_a_tensor(opener: Callable[..., RedisBackend], call: str) -> None:
    """A chunk evicted by maxmemory or deleted by hand: the item reads as absent and is removed."""
    be = opener(chunk_bytes=1024)
    be.put("k", make_tensor((40, 40), torch.float16, seed=2))
    be.put("other", make_tensor((40, 40), torch.float16, seed=3))
    be.client.delete(chunk_keys(be, "k")[1])
    out = torch.empty((40, 40), dtype=torch.float16)
    read = {"get": lambda: be.get("k"), "get_into": lambda: be.get_into("k", out),
            "get_many": lambda: be.get_many(["other", "k"])}[call]
    with pytest.raises(EntryNotFoundError, match="chunk 1 of 4 is gone"):
        read()
    assert be.exists(["k", "other"]) == [False, True]
    assert all(b"{k}" not in k for k in all_keys(be)), "what was left of the damaged item is removed"
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
    keys = chunk_keys(be, "k")
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
    old = chunk_keys(be, "k")
    assert all(be.client.pttl(k) == -1 for k in old), "a finished write's chunks must not expire"
    be.put("k", make_tensor((30, 50), torch.float16, seed=6))
    new = chunk_keys(be, "k")
    assert set(old).isdisjoint(new), "every version writes its own chunk keys"
    assert all(0 < be.client.pttl(k) <= 7000 for k in old), "displaced chunks expire after timeout_s"
    assert all(be.client.pttl(k) == -1 for k in new)
    be.put("k", torch.ones(4))  # a whole entry displaces a chunked one too
    assert all(0 < be.client.pttl(k) <= 7000 for k in new)
    assert torch.equal(be.get("k"), torch.ones(4))
    be.put("k2", make_tensor((40, 40), torch.float16, seed=7))
    be.delete(["k", "k2"])
    left = [k for k in all_keys(be) if be.client.pttl(k) == -1]
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
    keys = all_keys(be)
    assert len(keys) == 4 and be.entry_key("k").encode() not in keys
    assert all(be.client.pttl(k) > 0 for k in keys), "orphaned chunks must carry an expiry"
    assert be.exists(["k"]) == [False]


def test_reader_racing_an_overwrite_gets_a_whole_version(opener: Callable[..., RedisBackend],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The old chunks vanish right after the reader fetched the manifest: it reads the new one."""
    reader, writer = opener(chunk_bytes=1024), opener(chunk_bytes=1024)
    old, new = make_tensor((40, 40), torch.float16, seed=9), make_tensor((20, 90), torch.float16, seed=10)
    writer.put("k", old)
    old_chunks = chunk_keys(writer, "k")
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
            doomed = chunk_keys(writer, "k")
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
    assert len(chunk_keys(be, "chunked")) == 4
    for k, got in zip(keys, be.get_many(keys)):
        assert same_bits(got, items[k]), k
    outs = [torch.empty_like(items[k]) for k in keys]
    be.get_many_into(keys, outs)
    for k, o in zip(keys, outs):
        assert same_bits(o, items[k]), k
    with pytest.raises(EntryNotFoundError, match="absent"):
        be.get_many(["tiny", "absent", "large"])
    chunk = chunk_keys(be, "chunked")[1]
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
    assert [k for k in all_keys(be) if b":c:" in k and be.client.pttl(k) == -1] == []


# ------------------------------------------------------------------------- TTL
def test_ttl_applies_to_every_key_of_an_item(opener: Callable[..., RedisBackend]) -> None:
    be = opener(chunk_bytes=1024, ttl_s=60, timeout_s=5)
    be.put("small", torch.ones(8))
    be.put("big", make_tensor((40, 40), torch.float16))
    assert 0 < be.client.pttl(be.entry_key("small")) <= 60_000
    manifest_ttl = be.client.pttl(be.entry_key("big"))
    chunk_ttls = [be.client.pttl(k) for k in chunk_keys(be, "big")]
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
            assert {be.client.keyslot(c) for c in chunk_keys(be, k)} == {be.client.keyslot(entry)}
        assert be.exists(keys + ["absent"]) == [True] * 40 + [False]
        be.delete(keys[::2])
        assert be.exists(keys) == [i % 2 == 1 for i in range(40)]
        assert same_bits(be.get("img-3"), make_tensor((20, 30), torch.bfloat16, seed=3))


def test_key_prefix_separates_stores(opener: Callable[..., RedisBackend]) -> None:
    a, b = opener(key_prefix="svc-a"), opener(key_prefix="svc-b")
    a.put("k", torch.ones(2))
    assert b.exists(["k"]) == [False]
    assert a.client.exists("svc-a:{k}") == 1


def test_lru_eviction_never_yields_a_partial_item(tmp_path: Path) -> None:
    """allkeys-lru evicts chunks and manifests independently: a read is whole or absent."""
    with servers.spawn(tmp_path / "lru", args=["--maxmemory", "8mb", "--maxmemory-policy", "allkeys-lru",
                                               "--maxmemory-samples", "3"]) as srv:
        with open_backend(srv.url, chunk_bytes=256 << 10) as be:
            items = {f"img-{i}": make_tensor((512, 1024), torch.uint8, seed=i) for i in range(24)}  # 24 x 512 KiB
            refused = set()
            for k, t in items.items():
                try:
                    be.put(k, t)
                except CapacityError as exc:  # the server evicted one of its chunks before the manifest
                    assert "evicted" in str(exc) and "maxmemory" in str(exc)
                    refused.add(k)
            outcomes = {"whole": 0, "absent": 0}
            for k, t in items.items():
                try:
                    got = be.get(k)
                except EntryNotFoundError:
                    outcomes["absent"] += 1
                    assert be.exists([k]) == [False]
                    continue
                assert k not in refused, f"{k}: a refused put left a readable item"
                assert same_bits(got, t), f"{k}: a wrong tensor after eviction"
                outcomes["whole"] += 1
            assert outcomes["absent"] > 0, "8 MB cannot hold 12 MB of items: something must have been evicted"
            assert be.client.info("stats")["evicted_keys"] > 0


def test_put_whose_chunk_is_evicted_mid_write_is_refused_as_capacity(opener: Callable[..., RedisBackend]) -> None:
    """What allkeys-lru can do to a put in progress, done on purpose: a chunk vanishes before the
    manifest goes in. The put says so (CapacityError, not a timeout) and leaves nothing readable."""
    be = opener(chunk_bytes=1024)
    client = be._client
    real_set_chunk = client.set_chunk
    written: list[str] = []

    def set_chunk_then_evict(key: str, value: memoryview, px: int) -> None:
        real_set_chunk(key, value, px)
        written.append(key)
        if len(written) == 3:
            be.client.delete(written[0])  # the server "evicts" the first chunk

    client.set_chunk = set_chunk_then_evict  # type: ignore[method-assign]
    try:
        with pytest.raises(CapacityError, match="evicted"):
            be.put("k", make_tensor((40, 40), torch.float16, seed=11))
    finally:
        client.set_chunk = real_set_chunk  # type: ignore[method-assign]
    assert len(written) > 3
    assert be.exists(["k"]) == [False]
    with pytest.raises(EntryNotFoundError):
        be.get("k")
