"""The framework-neutral lifecycle (ectransfer.connector) on the in-process memory backend.

Scheduler side and worker side talk over the real control channel (abstract Unix sockets),
exactly as they do under vLLM; only the transport is the memory backend.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from ectransfer import ConfigError, open_backend
from ectransfer.backends.memory import MemoryBackend
from ectransfer.connector.channel import ChannelClient, ChannelServer, channel_address
from ectransfer.connector.options import ConnectorOptions, Role, split_options
from ectransfer.connector.plan import ItemRef, StepPlan, WorkerReport
from ectransfer.connector.scheduler import ItemSpec, SchedulerSide
from ectransfer.connector.stats import merge_stats, summarize
from ectransfer.connector.worker import WorkerSide
from ectransfer.keys import key_for_identifier
from ectransfer.testing import make_tensor, same_bits


def _wait(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


class Rig:
    """One store, one producer worker, one consumer scheduler + ``ranks`` consumer workers."""

    def __init__(self, ranks: int = 1, **opts: Any) -> None:
        self.store = f"core-{uuid.uuid4().hex}"
        self.options = ConnectorOptions.from_options({"lookup_timeout_s": 2.0, "load_timeout_s": 5.0, **opts})
        self.producer = WorkerSide(self.open(), self.options, produce=True, consume=False)
        engine = uuid.uuid4().hex
        self.workers = [WorkerSide(self.open(), self.options, produce=False, consume=True) for _ in range(ranks)]
        self.servers = [ChannelServer(channel_address(engine, 0, r), w.handle) for r, w in enumerate(self.workers)]
        channel = ChannelClient([channel_address(engine, 0, r) for r in range(ranks)])
        self.sched = SchedulerSide(self.open(), channel, Role.CONSUMER, self.options, ranks=ranks)

    def open(self) -> MemoryBackend:
        be = open_backend(f"memory://{self.store}")
        assert isinstance(be, MemoryBackend)
        return be

    def save(self, item_id: str, t: torch.Tensor) -> None:
        self.producer.save(item_id, key_for_identifier(item_id), t)
        self.producer._saver.flush(10)  # type: ignore[union-attr]

    def corrupt(self, item_id: str) -> None:
        be = self.open()
        with be._store.lock:
            blob = bytearray(be._store.entries[item_id])
            blob[-1] ^= 0xFF
            be._store.entries[item_id] = bytes(blob)

    def settle(self, req: str, specs: list[ItemSpec], computed: int = 0) -> bool:
        """ensure_available until it says True (what the engine's step loop does)."""
        _wait(lambda: self.sched.ensure_available(req, specs, computed))
        return True

    def close(self) -> None:
        for s in self.servers:
            s.close()
        self.sched.close()
        for w in [self.producer, *self.workers]:
            w.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def spec(item_id: str, n: int, *, start: int = 2, media: bool = True, announced: bool = False) -> ItemSpec:
    return ItemSpec(ItemRef(item_id, key_for_identifier(item_id), n, "image"), start, start + n,
                    has_media=media, announced=announced)


# ------------------------------------------------------------------------------ happy path
def test_saved_item_is_fetched_verified_then_loaded(rig: Rig) -> None:
    emb = make_tensor((16, 32), torch.bfloat16, seed=1)
    rig.save("img-a", emb)
    s = spec("img-a", 16)
    assert rig.sched.ensure_available("r1", [s], 0) is False, "must wait for the fetch"
    assert rig.sched.has_item("img-a") is False, "not loadable before it is verified"
    rig.settle("r1", [s])
    assert rig.sched.has_item("img-a") is True
    assert rig.workers[0].staged_bytes == emb.numel() * 2
    rig.sched.on_alloc("r1", s.ref)
    plan = rig.sched.build_plan()
    assert [r.item_id for r in plan.load] == ["img-a"]
    cache: dict[str, torch.Tensor] = {}
    rig.workers[0].load(plan, cache)
    assert same_bits(cache["img-a"], emb)
    assert rig.workers[0].staged_bytes == 0
    assert rig.workers[0].finished()[1] == {"img-a"}
    assert rig.sched.build_plan().load == [], "a plan is used once"


def test_miss_is_encoded_locally_without_waiting(rig: Rig) -> None:
    s = spec("never-saved", 8)
    assert rig.sched.ensure_available("r1", [s], 0) is True
    assert rig.sched.has_item("never-saved") is False
    rig.sched.on_alloc("r1", s.ref)
    assert rig.sched.build_plan().load == []
    assert rig.sched.take_stats()["counters"]["lookup_misses"] == 1


def test_items_already_computed_or_resident_are_not_fetched(rig: Rig) -> None:
    rig.save("img-a", torch.ones(4, 4))
    s = spec("img-a", 4, start=0)
    assert rig.sched.ensure_available("r1", [s], num_computed_tokens=10) is True  # range already behind us
    rig.sched.on_alloc("r0", s.ref)  # allocated by another request: in the engine's cache
    assert rig.sched.ensure_available("r1", [s], 0) is True
    rig.sched.build_plan(["img-a"])  # evicted from the engine's cache
    assert rig.sched.ensure_available("r1", [s], 0) is False


# ------------------------------------------------------------------------------ failures
def test_corrupt_item_is_never_served_and_reencodes(rig: Rig) -> None:
    rig.save("img-c", torch.ones(8, 8))
    rig.corrupt("img-c")
    s = spec("img-c", 8)
    rig.settle("r1", [s])
    assert rig.sched.has_item("img-c") is False, "a corrupt item must read as absent (re-encode)"
    assert rig.sched.take_failed_requests() == set()
    rig.sched.on_alloc("r1", s.ref)
    assert rig.sched.build_plan().load == []
    counters = rig.sched.take_stats()["counters"]
    assert counters["items_failed_corrupt"] == 1 and counters["reencodes"] == 1


def test_corrupt_item_without_media_fails_only_its_request(rig: Rig) -> None:
    rig.save("img-c", torch.ones(8, 8))
    rig.save("img-ok", torch.zeros(8, 8))
    rig.corrupt("img-c")
    bad, good = spec("img-c", 8, media=False), spec("img-ok", 8, media=False)
    _wait(lambda: not rig.sched.ensure_available("r-bad", [bad], 0) and "r-bad" in rig.sched._failed_requests)
    assert rig.sched.ensure_available("r-bad", [bad], 0) is False, "never schedule what cannot be encoded"
    rig.settle("r-good", [good])
    assert rig.sched.take_failed_requests() == {"r-bad"}
    assert rig.sched.has_item("img-ok") is True


def test_policy_fail_fails_even_with_media(rig: Rig) -> None:
    r = Rig(on_load_failure="fail")
    try:
        r.save("img-c", torch.ones(8, 8))
        r.corrupt("img-c")
        s = spec("img-c", 8)
        _wait(lambda: not r.sched.ensure_available("r1", [s], 0) and "r1" in r.sched._failed_requests)
        assert r.sched.take_failed_requests() == {"r1"}
    finally:
        r.close()


def test_wrong_number_of_embeddings_is_a_failure(rig: Rig) -> None:
    rig.save("img-s", torch.ones(5, 8))
    s = spec("img-s", 6)
    rig.settle("r1", [s])
    assert rig.sched.has_item("img-s") is False
    assert rig.sched.take_stats()["counters"]["items_failed_shape"] == 1


def test_announced_item_that_arrives_late_is_waited_for(rig: Rig) -> None:
    emb = make_tensor((4, 4), torch.float16, seed=2)
    s = spec("img-late", 4, announced=True)
    assert rig.sched.ensure_available("r1", [s], 0) is False
    threading.Timer(0.3, rig.save, args=("img-late", emb)).start()
    rig.settle("r1", [s])
    assert rig.sched.has_item("img-late") is True


def test_announced_item_that_never_arrives_times_out() -> None:
    r = Rig(load_timeout_s=0.5)
    try:
        s = spec("img-ghost", 4, announced=True)
        t0 = time.monotonic()
        r.settle("r1", [s])
        assert time.monotonic() - t0 < 5
        assert r.sched.has_item("img-ghost") is False
    finally:
        r.close()


def test_staging_bound_fails_the_fetch_instead_of_waiting() -> None:
    r = Rig(max_staged_bytes=1000)
    try:
        r.save("big", torch.ones(32, 32))  # 4 KiB > 1000 bytes
        s = spec("big", 32)
        r.settle("r1", [s])
        assert r.sched.has_item("big") is False
        assert r.workers[0].staged_bytes == 0
        assert r.sched.take_stats()["counters"]["items_failed_capacity"] == 1
    finally:
        r.close()


class _SlowExists(MemoryBackend):
    gate = threading.Event()

    def _exists(self, skeys: list[str]) -> list[bool]:
        self.gate.wait(30)
        return super()._exists(skeys)


def test_slow_lookup_is_bounded_and_counted_as_miss() -> None:
    options = ConnectorOptions(lookup_timeout_s=0.2)
    slow = _SlowExists(open_backend("memory://").config)
    sched = SchedulerSide(slow, None, Role.CONSUMER, options)
    try:
        t0 = time.monotonic()
        assert sched.ensure_available("r1", [spec("a", 4)], 0) is True
        assert sched.ensure_available("r2", [spec("b", 4)], 0) is True  # answered at once: lookup still stuck
        assert time.monotonic() - t0 < 2.0
        counters = sched.take_stats()["counters"]
        assert counters["lookup_timeouts"] == 1 and counters["lookups_skipped"] == 1
    finally:
        _SlowExists.gate.set()
        sched.close()


# ------------------------------------------------------------------------------ lifecycle
def test_finished_request_drops_its_staged_items(rig: Rig) -> None:
    rig.save("img-a", torch.ones(8, 8))
    s = spec("img-a", 8)
    rig.settle("r1", [s])
    assert rig.workers[0].staged_bytes > 0
    rig.sched.request_finished("r1")
    _wait(lambda: rig.workers[0].staged_bytes == 0)
    assert rig.sched.tracked_items == 0


def test_shared_item_survives_until_its_last_request_finishes(rig: Rig) -> None:
    rig.save("img-a", torch.ones(8, 8))
    s = spec("img-a", 8)
    rig.settle("r1", [s])
    rig.settle("r2", [s])
    rig.sched.request_finished("r1")
    assert rig.sched.has_item("img-a") is True
    rig.sched.request_finished("r2")
    _wait(lambda: rig.workers[0].staged_bytes == 0)


def test_tensor_parallel_waits_for_every_rank() -> None:
    r = Rig(ranks=2)
    try:
        r.save("img-a", torch.ones(8, 8))
        s = spec("img-a", 8)
        r.settle("r1", [s])
        assert all(w.staged_bytes > 0 for w in r.workers), "ready means staged on every rank"
        r.sched.on_alloc("r1", s.ref)
        plan = r.sched.build_plan()
        for w in r.workers:
            cache: dict[str, torch.Tensor] = {}
            w.load(plan, cache)
            assert torch.equal(cache["img-a"], torch.ones(8, 8))
    finally:
        r.close()


def test_answer_to_an_earlier_fetch_is_ignored(rig: Rig) -> None:
    s = spec("img-a", 4, announced=True)
    rig.sched.ensure_available("r1", [s], 0)
    rig.sched.channel.events.put({"ev": "ready", "id": "img-a", "seq": -1})  # type: ignore[union-attr]
    rig.sched.poll()
    assert rig.sched.has_item("img-a") is False


def test_save_failure_is_reported_not_raised() -> None:
    options = ConnectorOptions(max_inflight_bytes=100)
    w = WorkerSide(open_backend("memory://"), options, produce=True, consume=False)
    try:
        w.save("big", "big", torch.ones(64, 64))  # larger than the in-flight bound
        report = w.report()
        assert report is not None and "big" in report.save_failed
        assert report.stats["counters"]["save_failures"] == 1
    finally:
        w.close()


def test_consumer_worker_does_not_save(rig: Rig) -> None:
    rig.workers[0].save("x", "x", torch.ones(2))
    assert rig.open().exists(["x"]) == [False]


# ------------------------------------------------------------------------------ options, stats
def test_split_options() -> None:
    url = f"memory://split-{uuid.uuid4().hex}"  # named stores live as long as the process: a fresh one
    conn, transport = split_options({"url": url, "load_timeout_s": "2.5", "max_bytes": "1KiB"})
    assert conn.load_timeout_s == 2.5
    assert transport.url == url and dict(transport.options) == {"max_bytes": "1KiB"}
    be = transport.open(Role.CONSUMER)
    assert isinstance(be, MemoryBackend) and be.config.max_bytes == 1024
    be.close()


@pytest.mark.parametrize("extra, match", [
    ({}, "needs 'url'"),
    ({"url": "memory://", "load_timeout_s": 0}, "load_timeout_s"),
    ({"url": "memory://", "on_load_failure": "retry"}, "on_load_failure"),
    ({"url": "memory://", "max_staged_bytes": "lots"}, "max_staged_bytes"),
    ({"url": 5}, "'url' must be a string"),
])
def test_bad_connector_options_name_the_key(extra: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        split_options(extra)


def test_unknown_backend_option_names_it_and_lists_connector_options() -> None:
    _, transport = split_options({"url": "memory://", "ttl_seconds": 3})
    with pytest.raises(ConfigError, match=r"'ttl_seconds'.*connector options: lookup_timeout_s"):
        transport.open(Role.CONSUMER)


def test_stats_merge_and_summary() -> None:
    a = {"counters": {"saves": 2}, "gauges": {"staged_bytes": 10}, "latency_ms": {"fetch": [1.0, 3.0]}}
    b = {"counters": {"saves": 1, "loads": 4}, "gauges": {"staged_bytes": 5}, "latency_ms": {"fetch": [2.0]}}
    m = merge_stats(a, b)
    assert m["counters"] == {"saves": 3, "loads": 4} and m["gauges"] == {"staged_bytes": 5}, "later gauge wins"
    assert merge_stats(a, b, sum_gauges=True)["gauges"] == {"staged_bytes": 15}, "two workers add up"
    s = summarize(m)
    assert s["saves"] == 3 and s["fetch_p50_ms"] == 2.0 and s["fetch_mean_ms"] == 2.0
    assert merge_stats({}, {}) == {}
    report = WorkerReport({"x": 1}, {}, a).merge(WorkerReport({"x": 1}, {"y": "boom"}, b))
    assert report.saved == {"x": 2} and report.save_failed == {"y": "boom"}
    assert report.stats["gauges"] == {"staged_bytes": 15}
    assert not StepPlan() and StepPlan([ItemRef("a", "a", 1)])


class _CountingBackend(MemoryBackend):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.puts = 0

    def _put(self, skey: str, tensor: torch.Tensor) -> None:
        self.puts += 1
        super()._put(skey, tensor)

    def stats(self) -> dict[str, Any]:
        return {"puts": self.puts, "role": "diagnostic text", "flag": True}


def test_backend_readings_are_reported_as_gauges() -> None:
    be = _CountingBackend(open_backend("memory://").config)
    w = WorkerSide(be, ConnectorOptions(), produce=True, consume=False)
    try:
        for i in range(3):
            w.save(f"k{i}", f"k{i}", torch.ones(2))
        w._saver.flush(10)  # type: ignore[union-attr]
        first = w.report()
        assert first is not None and first.stats["gauges"]["backend_puts"] == 3
        assert "backend_role" not in first.stats["gauges"] and "backend_flag" not in first.stats["gauges"]
        w.save("k9", "k9", torch.ones(2))
        w._saver.flush(10)  # type: ignore[union-attr]
        second = w.report()
        assert second is not None and second.stats["gauges"]["backend_puts"] == 4
    finally:
        w.close()
