"""Tiered backend: conformance on real stacks, then promotion, eviction, write policies, faults.

Every tier is a real backend: private or named ``memory`` stores, ``fs`` in a temp directory and
real ``redis-server`` processes on loopback (started and stopped by the fixtures here). The
conformance kit runs on memory→fs, memory→redis, a write-around memory read cache → redis, and
memory → fs written back in the background.
"""

from __future__ import annotations

import json
import re
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
    BackendUnavailableError,
    CapacityError,
    ConfigError,
    CorruptEntryError,
    EntryNotFoundError,
    TransferTimeoutError,
    open_backend,
)
from ectransfer.backend import Backend
from ectransfer.backends.memory import MemoryBackend
from ectransfer.backends.tiered import TieredBackend, TieredConfig
from ectransfer.testing import MUTATIONS, BackendTests, eventually, make_tensor, same_bits
from ectransfer.testing.servers import SpawnedServer
from tests.faults.target_tiered import corrupt_tiers, tiered_url

needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
NETWORK_ERRORS = (BackendConnectionError, TransferTimeoutError)
ENTRY_OVERHEAD = 512  # bytes a memory-tier entry adds to its payload (the wire-codec header), at most


def _redis_servers() -> Any:
    pytest.importorskip("redis", reason="the redis tiers need redis-py: pip install 'ectransfer[redis]'")
    from ectransfer.testing.servers import redis as servers

    return servers


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpawnedServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    with _redis_servers().spawn(tmp_path_factory.mktemp("tiered-redis")) as server:
        yield server


@pytest.fixture
def redis_store(redis_server: SpawnedServer) -> SpawnedServer:
    _redis_servers().flush(redis_server)
    return redis_server


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[SpawnedServer]:
    """A server of this test's own, which the test may kill and restart."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    with _redis_servers().spawn(tmp_path / "redis") as server:
        yield server


def _redis_tier(server: SpawnedServer, **extra: Any) -> dict[str, Any]:
    return {"url": server.url, **server.options, **extra}


def stack(*tiers: Any, **options: Any) -> TieredBackend:
    be = open_backend(backend="tiered", tiers=list(tiers), **options)
    assert isinstance(be, TieredBackend)
    return be


class _CorruptEveryTier:
    def corrupt(self, backend: Backend[Any], key: str, mutate: Callable[[bytes], bytes]) -> None:
        corrupt_tiers(backend, key, mutate)


# =========================================================================== conformance
class TestMemoryFs(_CorruptEveryTier, BackendTests):
    @pytest.fixture
    def backend_factory(self, tmp_path: Path) -> Callable[..., Backend[Any]]:
        return lambda **opts: stack({"url": "memory://", "max_bytes": "8MiB"}, f"file://{tmp_path}", **opts)


@needs_redis
class TestMemoryRedis(_CorruptEveryTier, BackendTests):
    @pytest.fixture
    def backend_factory(self, redis_store: SpawnedServer) -> Callable[..., Backend[Any]]:
        return lambda **opts: stack({"url": "memory://", "max_bytes": "8MiB"}, _redis_tier(redis_store), **opts)


@needs_redis
class TestReadCacheRedis(_CorruptEveryTier, BackendTests):
    """write='around': puts go to Redis only; the shared memory tier is filled by reads."""

    @pytest.fixture
    def backend_factory(self, redis_store: SpawnedServer, request: pytest.FixtureRequest) -> Callable[..., Any]:
        name = re.sub(r"[^A-Za-z0-9]", "-", request.node.name)[-100:]
        return lambda **opts: stack({"url": f"memory://rc-{name}", "write": "around", "max_bytes": "8MiB"},
                                    _redis_tier(redis_store), **opts)


class TestMemoryFsWriteBack(_CorruptEveryTier, BackendTests):
    """fs written in the background: reads of queued items come from the queue."""

    @pytest.fixture
    def backend_factory(self, tmp_path: Path) -> Callable[..., Backend[Any]]:
        return lambda **opts: stack("memory://", {"url": f"file://{tmp_path}", "write": "back"}, **opts)


# =========================================================================== configuration
def test_errors_name_the_tier_and_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tier 1 \(fs .*unknown option\(s\) 'fsyncc'"):
        stack("memory://", {"url": f"file://{tmp_path}", "fsyncc": True})
    with pytest.raises(ConfigError, match=r"tier 0 \(memory memory://\).*max_bytes: expected a byte size"):
        stack({"url": "memory://", "max_bytes": "lots"}, f"file://{tmp_path}")
    with pytest.raises(ConfigError, match=r"tier 1: 'write' must be one of through, back, around, got 'later'"):
        stack("memory://", {"url": f"file://{tmp_path}", "write": "later"})
    with pytest.raises(ConfigError, match=r"tier 0: 'promote' must be true or false"):
        stack({"url": "memory://", "promote": "sometimes"}, f"file://{tmp_path}")
    with pytest.raises(ConfigError, match=r"tier 1: expected a URL string or a mapping, got int"):
        stack("memory://", 7)
    with pytest.raises(ConfigError, match=r"tier 0: needs 'url'"):
        stack({"max_bytes": "1MiB"})
    with pytest.raises(ConfigError, match=r"tier 0: 'namespace' belongs to the whole stack"):
        stack({"url": "memory://", "namespace": "other"}, namespace="mine")
    with pytest.raises(ConfigError, match=r"tier 1 \(tiered\).*cannot itself be a tiered stack"):
        stack("memory://", {"backend": "tiered", "tiers": ["memory://"]})
    with pytest.raises(ConfigError, match=r"tier 0 \(nosuch\): unknown backend 'nosuch'"):
        stack({"backend": "nosuch"})
    with pytest.raises(ConfigError, match=r"at least one tier needs write='through'"):
        stack({"url": "memory://", "write": "around"}, {"url": f"file://{tmp_path}", "write": "back"})
    with pytest.raises(ConfigError, match=r"tier 0 has write='back' above tier 1"):
        stack({"url": "memory://", "write": "back"}, f"file://{tmp_path}")


def test_the_tier_list_is_required_and_checked() -> None:
    with pytest.raises(ConfigError, match="option 'tiers' is required"):
        open_backend("tiered://")
    with pytest.raises(ConfigError, match=r"'tiers' is not valid JSON \(Expecting"):
        open_backend("tiered://?tiers=%5B%7B%22url%22")
    with pytest.raises(ConfigError, match="'tiers' must be a list of tiers, got dict"):
        open_backend(backend="tiered", tiers={"url": "memory://"})
    with pytest.raises(ConfigError, match="names no location"):
        open_backend("tiered://somewhere?tiers=%5B%22memory%3A%2F%2F%22%5D")
    with pytest.raises(ConfigError, match="unknown option.*'tierz'"):
        open_backend(backend="tiered", tierz=["memory://"])
    with pytest.raises(ConfigError, match="'write_back_max_bytes' must be > 0"):
        open_backend(backend="tiered", tiers=["memory://"], write_back_max_bytes=0)


def test_peer_to_peer_tiers_are_refused() -> None:
    from ectransfer.registry import backend_class

    try:
        usable = backend_class("nixl").is_available()[0]
    except BackendUnavailableError:
        usable = False
    why = "is peer-to-peer" if usable else "not available"  # refused either way; say which here
    with pytest.raises((ConfigError, BackendUnavailableError), match=rf"tier 1 \(nixl nixl://.*{why}"):
        stack("memory://", "nixl://127.0.0.1:7600")


def test_url_json_option_string_and_vllm_extra_config_open_the_same_stack(tmp_path: Path) -> None:
    from ectransfer.connector.options import Role, split_options

    tiers = [{"url": "memory://", "max_bytes": "2MiB"}, {"url": f"file://{tmp_path}"}]
    t = make_tensor((16, 8), torch.bfloat16, seed=1)
    with open_backend(tiered_url(tiers)) as be:
        be.put("k", t)
    opened = [
        open_backend(backend="tiered", tiers=json.dumps(tiers)),
        open_backend("tiered://", tiers=tiers),
        split_options({"backend": "tiered", "tiers": tiers, "lookup_timeout_s": 1.0})[1].open(Role.CONSUMER),
        split_options({"url": tiered_url(tiers)})[1].open(Role.CONSUMER),
    ]
    for be in opened:
        try:
            assert isinstance(be, TieredBackend)
            assert [s.backend for s in be.specs] == ["memory", "fs"]
            assert be.tiers[0].config.max_bytes == 2 << 20
            assert same_bits(be.get("k"), t)
        finally:
            be.close()


def test_tiers_inherit_namespace_and_timeout_unless_they_set_a_timeout(tmp_path: Path) -> None:
    with stack("memory://", {"url": f"file://{tmp_path}", "timeout_s": 7}, f"file://{tmp_path}/b?timeout_s=5",
               namespace="m1", timeout_s=3) as be:
        assert [t.namespace for t in be.tiers] == ["m1", "m1", "m1"]
        assert [t.config.timeout_s for t in be.tiers] == [3, 7, 5], "a tier's own timeout_s (option or query) wins"
        be.put("k", torch.ones(3))
    assert (tmp_path / "m1" / "k" / "encoder_cache.safetensors").is_file(), "the fs tier keeps the fs layout"


@needs_redis
def test_credentials_never_show(redis_store: SpawnedServer, tmp_path: Path) -> None:
    secret = "pa55-w0rd-xyzzy"
    port = _redis_servers().port_of(redis_store.processes[0])
    tiers = ["memory://", {"url": f"redis://user:{secret}@127.0.0.1:{port}/0"}]
    config = TieredConfig.from_options({"tiers": tiers})
    shown = [repr(config), str(config.describe()), repr(config.specs)]
    with pytest.raises(BackendConnectionError) as info:  # wrong credentials: the server refuses them
        TieredBackend(config)
    shown.append(str(info.value))
    with pytest.raises(ConfigError) as bad:
        stack("memory://", {"url": f"redis://user:{secret}@127.0.0.1:{port}/0", "chunk_bytes": "tiny"})
    shown.append(str(bad.value))
    with stack("memory://", _redis_tier(redis_store)) as be:
        shown += [repr(be), str(be.stats())]
    for text in shown:
        assert secret not in text, text
    assert "redis://user:***@127.0.0.1" in shown[0]


# =========================================================================== capabilities
def test_capabilities_are_derived_from_the_tiers(tmp_path: Path) -> None:
    fs = f"file://{tmp_path}"
    assert TieredBackend.capabilities.shared_across_hosts is False  # nothing promised before tiers exist
    cases: list[tuple[tuple[Any, ...], tuple[bool, bool, bool]]] = [
        (("memory://", fs), (True, True, False)),
        (("memory://", {"url": fs, "write": "back"}), (False, False, False)),  # only memory acknowledges
        (({"url": "memory://", "write": "around"}, fs), (True, True, False)),
        (({"url": fs, "ttl_s": 60}, {"url": str(tmp_path / "b"), "ttl_s": 60}), (True, True, True)),
        (("memory://",), (False, False, False)),
    ]
    for tiers, (shared, persistent, ttl) in cases:
        with stack(*tiers) as be:
            caps = type(be).capabilities
            assert isinstance(be, TieredBackend) and type(be).name == "tiered"
            assert (caps.shared_across_hosts, caps.persistent, caps.ttl) == (shared, persistent, ttl), tiers
            assert caps.peer_to_peer is False and caps.zero_copy_device is False


# =========================================================================== promotion
def test_a_hit_below_is_promoted_and_the_next_read_is_served_above(tmp_path: Path) -> None:
    items = {f"img-{i}": make_tensor((64, 32), torch.bfloat16, seed=i) for i in range(3)}
    with stack({"url": "memory://", "write": "around"}, f"file://{tmp_path}") as producer:
        producer.put_many(items)
        assert producer.tiers[0].exists(list(items)) == [False] * 3, "write='around' skips the memory tier"
    with stack({"url": "memory://", "max_bytes": "1MiB"}, f"file://{tmp_path}") as consumer:
        memory = consumer.tiers[0]
        assert memory.exists(list(items)) == [False] * 3
        for k, t in items.items():
            assert same_bits(consumer.get(k), t)
        assert memory.exists(list(items)) == [True] * 3, "every hit below was promoted"
        out = torch.empty_like(items["img-0"])
        consumer.get_into("img-0", out)
        assert same_bits(out, items["img-0"])
        s = consumer.stats()
        assert (s["tier1_hits"], s["tier0_misses"], s["tier0_promotions"]) == (3, 3, 3)
        assert s["tier0_hits"] == 1 and s["tier0_bytes_read"] == 64 * 32 * 2
        assert s["tier1_bytes_read"] == 3 * 64 * 32 * 2


def test_promote_false_keeps_a_tier_out_of_reads(tmp_path: Path) -> None:
    with stack({"url": "memory://", "promote": False}, {"url": f"file://{tmp_path}/a"},
               f"file://{tmp_path}/b") as be:
        be.tiers[2].put("k", torch.ones(4))
        assert same_bits(be.get("k"), torch.ones(4))
        assert be.tiers[0].exists(["k"]) == [False], "promote=False: not filled by reads"
        assert be.tiers[1].exists(["k"]) == [True]


def test_concurrent_reads_never_promote_a_version_older_than_the_last_put(tmp_path: Path) -> None:
    """Readers miss the write-around cache (every put empties it) and promote what they read
    below; a put landing between a reader's read and its promotion would leave an older
    version in the cache, served from then on, without the per-key lock."""
    shape = (64, 1024)  # 256 KiB: reads long enough for puts to land in the middle of them
    with stack({"url": "memory://", "write": "around"}, f"file://{tmp_path}") as be:
        be.put("hot", torch.full(shape, 0, dtype=torch.int32))
        stop = threading.Event()
        errors: list[BaseException] = []

        def read() -> None:
            try:
                while not stop.is_set():
                    be.get("hot")
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        readers = [threading.Thread(target=read) for _ in range(3)]
        for th in readers:
            th.start()
        stale = []
        try:
            for v in range(1, 301):
                be.put("hot", torch.full(shape, v, dtype=torch.int32))
                time.sleep(0.005)  # reads that began before the put end (and promote) meanwhile
                try:
                    cached = int(be.tiers[0].get("hot")[0, 0])
                except EntryNotFoundError:
                    continue
                if cached != v:
                    stale.append((v, cached))
        finally:
            stop.set()
            for th in readers:
                th.join(60)
        assert not errors, errors[0]
        assert not stale, f"(put, then cached) pairs: {stale[:5]}"
        assert int(be.get("hot")[0, 0]) == 300


# =========================================================================== eviction and capacity
def test_the_memory_tier_stays_under_its_byte_bound_and_evictions_count(tmp_path: Path) -> None:
    item = 64 * 1024  # payload bytes per item
    bound = 3 * item + 3 * ENTRY_OVERHEAD
    items = {f"e{i}": make_tensor((item,), torch.uint8, seed=i) for i in range(8)}
    with stack({"url": "memory://", "max_bytes": bound}, f"file://{tmp_path}") as be:
        memory = be.tiers[0]
        assert isinstance(memory, MemoryBackend)
        for k, t in items.items():
            be.put(k, t)
            assert memory.nbytes <= bound
        assert memory.exists(list(items)) == [False] * 5 + [True] * 3, "LRU: the 3 newest stay"
        assert be.stats()["tier0_evictions"] == 5
        for k, t in items.items():  # every item is still served, from fs when evicted above
            assert same_bits(be.get(k), t)
            assert memory.nbytes <= bound
        s = be.stats()
        assert s["tier1_hits"] == 8 and s["tier0_promotions"] == 8 and s["tier0_evictions"] == 5 + 8
        assert memory.exists(list(items)) == [False] * 5 + [True] * 3, "the 3 most recently read stay"


def test_the_last_tier_bound_evicts_from_the_whole_stack(tmp_path: Path) -> None:
    item = 64 * 1024
    with stack("memory://", {"url": f"file://{tmp_path}", "max_bytes": 2 * item + 2 * 4096 + 1024}) as be:
        for i in range(3):
            be.put(f"k{i}", make_tensor((item,), torch.uint8, seed=i))
        assert be.tiers[1].exists(["k0", "k1", "k2"]) == [False, True, True]
    with stack("memory://", f"file://{tmp_path}") as fresh:  # nothing of k0 anywhere any more
        with pytest.raises(EntryNotFoundError):
            fresh.get("k0")
        assert same_bits(fresh.get("k2"), make_tensor((item,), torch.uint8, seed=2))


def test_an_item_too_large_for_a_tier_skips_it_and_drops_its_older_version(tmp_path: Path) -> None:
    small, big = torch.ones(16), make_tensor((300_000,), torch.uint8, seed=3)
    with stack({"url": "memory://", "max_bytes": "64KiB"}, f"file://{tmp_path}") as be:
        be.put("k", small)
        assert be.tiers[0].exists(["k"]) == [True]
        be.put("k", big)
        assert be.tiers[0].exists(["k"]) == [False], "the older, smaller version must not stay above"
        assert same_bits(be.get("k"), big)
        s = be.stats()
        assert s["tier0_too_large"] == 2  # the put, then the promotion of the read
        be.put_many({"a": small, "b": big})
        assert be.tiers[0].exists(["a", "b"]) == [True, False]
    with stack({"url": "memory://", "max_bytes": "64KiB"}) as alone, pytest.raises(CapacityError):
        alone.put("k", big)  # no slower tier to hold it: the put fails


# =========================================================================== write policies
def test_write_around_drops_the_cached_copy_on_put(tmp_path: Path) -> None:
    with stack({"url": "memory://", "write": "around"}, f"file://{tmp_path}") as be:
        be.put("k", torch.full((4,), 1.0))
        assert same_bits(be.get("k"), torch.full((4,), 1.0))
        assert be.tiers[0].exists(["k"]) == [True], "the read filled the cache"
        be.put("k", torch.full((4,), 2.0))
        assert be.tiers[0].exists(["k"]) == [False]
        assert same_bits(be.get("k"), torch.full((4,), 2.0))


@needs_redis
def test_write_back_acknowledges_before_the_slow_tier_and_never_loses_the_item(own_redis: SpawnedServer) -> None:
    servers = _redis_servers()
    item = make_tensor((32 * 1024,), torch.uint8, seed=5)
    tiers = [{"url": "memory://", "max_bytes": 32 * 1024 + ENTRY_OVERHEAD}, _redis_tier(own_redis, write="back")]
    with stack(*tiers, timeout_s=2) as be:
        for p in own_redis.processes:
            p.kill()
        be.put("acked", item)  # returns although the write-back tier is down: acknowledged
        be.put("evicts-it", make_tensor((32 * 1024,), torch.uint8, seed=6))
        assert be.tiers[0].exists(["acked"]) == [False], "the memory tier's LRU evicted it"
        assert same_bits(be.get("acked"), item), "an acknowledged item is served from the write-back queue"
        assert be.exists(["acked"]) == [True]
        s = be.stats()
        assert s["write_back_pending"] == 2 and s["write_back_hits"] == 1
        with pytest.raises(TransferTimeoutError):
            be.flush(0.5)
        servers.restart(own_redis)
        be.flush(30)
        s = be.stats()
        assert s["write_back_pending"] == 0 and s["write_back_retries"] >= 1
        assert s["write_back_written"] == 2 and s["write_back_lost"] == 0
    with stack("memory://", _redis_tier(own_redis)) as reader:  # another stack: only Redis can have it
        assert same_bits(reader.get("acked"), item)


@needs_redis
def test_write_back_queue_full_fails_the_put_before_anything_is_written(own_redis: SpawnedServer) -> None:
    tiers = ["memory://", _redis_tier(own_redis, write="back")]
    with stack(*tiers, timeout_s=1, write_back_max_bytes=100_000) as be:
        for p in own_redis.processes:
            p.kill()
        be.put("first", torch.zeros(60_000, dtype=torch.uint8))
        with pytest.raises(TransferTimeoutError, match="write-back queue stayed full"):
            be.put("second", torch.zeros(60_000, dtype=torch.uint8))
        assert be.tiers[0].exists(["second"]) == [False], "a put that was not acknowledged wrote nothing"
        with pytest.raises(CapacityError, match="write_back_max_bytes"):
            be.put("huge", torch.zeros(200_000, dtype=torch.uint8))
        with pytest.raises(TransferTimeoutError):  # a batch over the bound goes item by item
            be.put_many({"third": torch.zeros(30_000, dtype=torch.uint8),
                         "fourth": torch.zeros(90_000, dtype=torch.uint8)})
        assert be.exists(["third"]) == [True] and be.tiers[0].exists(["fourth"]) == [False]
        servers = _redis_servers()
        servers.restart(own_redis)
        be.flush(30)
        be.put("second", torch.zeros(60_000, dtype=torch.uint8))  # room again
        be.flush(30)


@needs_redis
def test_close_with_the_write_back_tier_down_reports_the_unwritten_items(own_redis: SpawnedServer) -> None:
    be = stack("memory://", _redis_tier(own_redis, write="back"), timeout_s=1, flush_timeout_s=0.5)
    for p in own_redis.processes:
        p.kill()
    be.put("a", torch.ones(8))
    be.put("b", torch.ones(8))
    with pytest.raises(TransferTimeoutError, match="2 acknowledged item"):
        be.close()
    assert be.closed and be.stats()["write_back_lost"] == 2


def test_a_write_back_tier_that_refuses_an_item_for_good_is_not_retried(tmp_path: Path) -> None:
    big = make_tensor((200_000,), torch.uint8, seed=4)
    with stack("memory://", {"url": f"file://{tmp_path}", "write": "back", "max_bytes": "64KiB"}) as be:
        be.put("big", big)  # acknowledged: the memory tier has it
        be.flush(30)  # the fs tier's CapacityError is permanent: nothing left to retry
        s = be.stats()
        assert (s["write_back_failures"], s["write_back_retries"], s["write_back_pending"]) == (1, 0, 0)
        assert be.tiers[1].exists(["big"]) == [False]
        assert same_bits(be.get("big"), big), "the item stays in the tier above"


def test_delete_drops_queued_items_too(tmp_path: Path) -> None:
    with stack("memory://", {"url": f"file://{tmp_path}", "write": "back"}) as be:
        be.put_many({f"k{i}": torch.full((1000,), float(i)) for i in range(20)})
        be.delete([f"k{i}" for i in range(20)])
        be.flush(30)
        assert be.exists([f"k{i}" for i in range(20)]) == [False] * 20
        assert be.tiers[1].exists([f"k{i}" for i in range(20)]) == [False] * 20, "a deleted item was written back"


# =========================================================================== corruption
def test_a_corrupt_upper_copy_is_skipped_and_healed_from_below(tmp_path: Path) -> None:
    t = make_tensor((40, 40), torch.float16, seed=2)
    with stack("memory://", f"file://{tmp_path}") as be:
        be.put("k", t)
        memory = be.tiers[0]
        assert isinstance(memory, MemoryBackend)
        with memory._store.lock:
            memory._store.entries["k"] = MUTATIONS["flipped_payload_byte"](memory._store.entries["k"])
        assert same_bits(be.get("k"), t)
        assert be.stats()["tier0_corrupt"] == 1
        assert same_bits(memory.get("k"), t), "the valid copy from below replaced the corrupt one"


def test_a_corrupt_lower_copy_is_never_served_nor_promoted(tmp_path: Path) -> None:
    t = make_tensor((40, 30), torch.float16, seed=2)
    with stack("memory://", f"file://{tmp_path}") as writer:
        writer.put("k", t)
        fs = writer.tiers[1]
        path = fs.entry_path(fs._skey("k"))  # type: ignore[attr-defined]
        path.write_bytes(MUTATIONS["lying_shape_header"](path.read_bytes()))
    with stack("memory://", f"file://{tmp_path}") as reader:
        with pytest.raises(CorruptEntryError, match=r"tier 1 \(fs"):
            reader.get("k")
        with pytest.raises(CorruptEntryError):
            reader.get_into("k", torch.empty_like(t))
        assert reader.tiers[0].exists(["k"]) == [False], "a corrupt entry was promoted"


# =========================================================================== a lower tier failing
@needs_redis
@pytest.mark.parametrize("upper", ["through", "around"])
def test_redis_down_degrades_as_documented_and_never_returns_a_wrong_tensor(own_redis: SpawnedServer,
                                                                             upper: str) -> None:
    cached, below = make_tensor((64, 64), torch.bfloat16, seed=1), make_tensor((64, 64), torch.bfloat16, seed=2)
    with stack({"url": "memory://", "write": upper, "max_bytes": "1MiB"}, _redis_tier(own_redis),
               timeout_s=2) as be:
        be.put("cached", cached)
        be.put("below", below)
        assert same_bits(be.get("cached"), cached)  # in the memory tier now, whatever the policy
        be.tiers[0].delete(["below"])  # as if evicted: only Redis has it
        for p in own_redis.processes:
            p.kill()
        # reads: an upper hit is served; what only Redis had is a typed error naming tier 1
        assert same_bits(be.get("cached"), cached)
        with pytest.raises(NETWORK_ERRORS, match=r"tier 1 \(redis"):
            be.get("below")
        with pytest.raises(NETWORK_ERRORS):
            be.get_into("below", torch.empty_like(below))
        # exists: a hit anywhere is True; a key nobody could confirm is the failing tier's error
        assert be.exists(["cached"]) == [True]
        with pytest.raises(NETWORK_ERRORS):
            be.exists(["cached", "below"])
        # put: a write-through tier failing fails the put, and the new value is served by no tier
        with pytest.raises(NETWORK_ERRORS):
            be.put("new", make_tensor((8,), torch.float32, seed=3))
        assert be.tiers[0].exists(["new"]) == [False]
        # delete: every other tier still loses it, then the failure is reported
        with pytest.raises(NETWORK_ERRORS):
            be.delete(["cached"])
        assert be.tiers[0].exists(["cached"]) == [False]
        assert be.stats()["tier1_errors"] >= 5
        _redis_servers().restart(own_redis)
        eventually(lambda: be.put("after", torch.full((4,), 3.0)), NETWORK_ERRORS, 15)
        assert same_bits(be.get("after"), torch.full((4,), 3.0))


# =========================================================================== stats into the connector
def test_tier_stats_reach_the_connector_gauges(tmp_path: Path) -> None:
    from ectransfer.connector.options import ConnectorOptions
    from ectransfer.connector.worker import WorkerSide

    be = stack({"url": "memory://", "max_bytes": "1MiB"}, f"file://{tmp_path}")
    w = WorkerSide(be, ConnectorOptions(), produce=True, consume=False)
    try:
        w.save("k", "k", torch.ones(256))
        w._saver.flush(10)  # type: ignore[union-attr]
        be.get("k")
        report = w.report()
        assert report is not None
        gauges = report.stats["gauges"]
        assert gauges["backend_tier0_hits"] == 1 and gauges["backend_tier1_bytes_written"] == 1024
        assert all(re.fullmatch(r"[a-z0-9_]+", name) for name in be.stats())
    finally:
        w.close()
