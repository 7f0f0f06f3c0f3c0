"""nixl backend: the conformance kit with producer and consumer in two processes, plus faults.

Every test talks to real NIXL agents over UCX on loopback: producers run in child processes
(:class:`~ectransfer.testing.remote.RemoteBackend`), the consumer here pulls with NIXL READs.
UCX_NET_DEVICES=lo and UCX_MODULES='^ib*' come from tests/conftest.py (children inherit them).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
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
from ectransfer.backends.nixl import NixlBackend, NixlConfig
from ectransfer.testing import BackendTests, make_tensor, same_bits
from ectransfer.testing.proxy import StallingProxy
from ectransfer.testing.remote import RemoteBackend
from ectransfer.testing.servers import free_port
from ectransfer.testing.servers.nixl import PeerPair, ProducerFleet, spawn, start_producer

ok, why = NixlBackend.is_available()
pytestmark = pytest.mark.skipif(not ok, reason=why)

NETWORK_ERRORS = (BackendConnectionError, TransferTimeoutError)
SLACK_S = 5.0  # scheduling slack on a loaded 2-core machine; the bound is what matters


def _wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# ------------------------------------------------------------------------- conformance kit
@pytest.fixture(scope="module")
def fleet() -> Iterator[ProducerFleet]:
    f = ProducerFleet(producer_options={"arena_bytes": "64MiB"})
    yield f
    f.close()


class TestNixlTwoProcesses(BackendTests):
    """``backend`` writes into a producer process; every read is a NIXL READ into this one."""

    @pytest.fixture
    def backend_factory(self, fleet: ProducerFleet) -> Callable[..., Backend[Any]]:
        fleet.clear()  # every test starts from an empty store
        return lambda **opts: fleet.open_pair(**opts)

    def corrupt(self, backend: Backend[Any], key: str, mutate: Callable[[bytes], bytes]) -> None:
        assert isinstance(backend, PeerPair)
        producer = backend.writer
        assert isinstance(producer, RemoteBackend)
        skey = backend._skey(key)
        producer.call_backend("store_entry_bytes", skey, mutate(producer.call_backend("entry_bytes", skey)))

    def test_arena_returns_to_zero(self, backend: Backend[Any], fleet: ProducerFleet) -> None:
        """Not a kit test: after release of everything read, the producer's arena is empty."""
        items = {f"z{i}": make_tensor((64, 33), torch.bfloat16, seed=i) for i in range(5)}
        backend.put_many(items)
        backend.put("z0", make_tensor((7,), torch.int8))  # an overwrite retires a version
        assert fleet.call("", "arena_used_bytes") > 0
        got = backend.get_many(list(items))
        assert same_bits(got[1], items["z1"])
        backend.release(list(items))
        assert _wait_for(lambda: fleet.call("", "arena_used_bytes") == 0, 10), fleet.call("", "stats")


# ------------------------------------------------------------------------- configuration
def test_url_lists_producers_and_options() -> None:
    cfg = NixlConfig.from_url("nixl://enc1:7600,[::1]:7601?x=1".split("?")[0], {"role": "consumer", "lease_s": "5"})
    assert cfg.peer_addresses == (("enc1", 7600), ("::1", 7601))
    assert cfg.role == "consumer" and cfg.lease_s == 5.0 and cfg.arena_bytes == 1 << 30
    assert NixlConfig.from_url("nixl://h:1", {"listen": "0.0.0.0:9"}).listen_address == ("0.0.0.0", 9)
    assert NixlConfig.from_url("nixl://h:1", {}).listen_address == ("h", 1)


@pytest.mark.parametrize("url, options, match", [
    ("nixl://h", {}, "host:port"),
    ("nixl://h:99999", {}, "host:port"),
    ("nixl://h:1/path", {}, "path"),
    ("nixl://h:1", {"role": "master"}, "role"),
    ("nixl://h:1", {"landing": "teleport"}, "landing"),
    ("nixl://h:1", {"hash_beside": "sometimes"}, "hash_beside"),
    ("nixl://h:1", {"arena_bytes": "lots"}, "arena_bytes"),
    ("nixl://h:1", {"lease_s": 0}, "lease_s"),
    ("nixl://h:1", {"lookup_timeout_s": -1}, "lookup_timeout_s"),
    ("nixl://h:1", {"arena_device": "tpu"}, "arena_device"),
    ("nixl://h:1", {"colour": "red"}, "colour"),
    ("nixl://", {}, "no producer"),
])
def test_bad_configuration_names_the_option(url: str, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        open_backend(url, **options)


def test_spawn_gives_a_url_every_process_can_use(tmp_path: Any) -> None:
    spawned = spawn(tmp_path)
    assert spawned.url.startswith("nixl://127.0.0.1:") and spawned.processes == []
    producer = start_producer(spawned.url, **spawned.options)
    try:
        consumer = open_backend(spawned.url, **{**spawned.options, "role": "consumer"})
        with consumer:
            t = make_tensor((16, 16), torch.float16, seed=2)
            producer.put("k", t)
            assert consumer.exists(["k"]) == [True]
            assert same_bits(consumer.get("k"), t)
    finally:
        producer.close()


# ------------------------------------------------------------------------- laziness and cheap exists
def test_no_nixl_agent_before_data_moves(fleet: ProducerFleet) -> None:
    """A scheduler-side consumer that only asks exists() never creates a NIXL agent."""
    with open_backend(fleet.url(), role="consumer", exists_cache_s=0) as be:
        assert be.exists(["never"]) == [False]
        assert be.stats()["agent"] is None
    port = free_port()
    with open_backend(f"nixl://127.0.0.1:{port}", role="producer") as prod:
        assert prod.stats()["serving"] and prod.stats()["agent"] is None  # listening, no agent yet
        prod.put("k", torch.ones(3))
        assert prod.stats()["agent"] is not None and prod.arena_used_bytes() > 0


_IDLE_CPU_SCRIPT = """
import os, sys, time, torch
from ectransfer import open_backend
from ectransfer.testing.servers import free_port
url = f"nixl://127.0.0.1:{free_port()}"
with open_backend(url, role="producer", arena_bytes="8MiB") as prod, \\
        open_backend(url, role="consumer", exists_cache_s=0) as cons:
    prod.put("k", torch.ones(1000))
    assert torch.equal(cons.get("k"), torch.ones(1000))  # both agents exist and have talked
    import nixl._api as api
    assert not type(api.nixlBind).__name__.startswith("_Delaying"), "nixl's bindings were not restored"
    t0 = time.process_time()
    time.sleep(1.0)
    print("IDLE_CPU", time.process_time() - t0, flush=True)
os._exit(0)
"""


def test_idle_agents_do_not_spin() -> None:
    """NIXL's Python API starts a progress thread that polls without sleeping (one core per
    agent, idle or not): the producer's must wait for events, the consumer has none."""
    proc = subprocess.run([sys.executable, "-c", _IDLE_CPU_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cpu = float(proc.stdout.split("IDLE_CPU")[1].split()[0])
    # A spinning thread costs about 1 CPU-second per second; idle agents cost a few ms.
    assert cpu < 0.3, f"{cpu:.2f} CPU-seconds in one idle second: a NIXL thread spins"


def test_exists_is_cheap_with_a_stalled_producer(fleet: ProducerFleet) -> None:
    healthy = fleet.producer("")
    port_b = free_port()
    stalled_producer = start_producer(f"nixl://127.0.0.1:{port_b}", arena_bytes="8MiB")
    proxy = StallingProxy(port_b)
    url = f"nixl://127.0.0.1:{fleet.port('')},127.0.0.1:{proxy.port}"
    be = open_backend(url, role="consumer", lookup_timeout_s=0.3, exists_cache_s=30, peer_backoff_s=30, timeout_s=2)
    try:
        healthy.put("on-a", torch.ones(2))
        stalled_producer.put("on-b", torch.ones(2))
        assert be.exists(["on-a", "on-b"]) == [True, True]
        proxy.stall()
        t0 = time.monotonic()
        assert be.exists(["on-a", "fresh"]) == [True, False]  # the stalled peer counts as "no"
        assert time.monotonic() - t0 < 0.3 + SLACK_S
        asked = be.stats()["exists_requests"]
        assert be.exists(["on-a", "fresh"]) == [True, False]
        assert be.stats()["exists_requests"] == asked, "a repeated question is answered from the cache"
        with pytest.raises(NETWORK_ERRORS):
            be.get("on-b")  # a get waits up to timeout_s, then fails typed
    finally:
        proxy.resume()
        be.close()
        proxy.close()
        stalled_producer.close()


def test_unreachable_producers_give_typed_errors() -> None:
    with open_backend(f"nixl://127.0.0.1:{free_port()},127.0.0.1:{free_port()}", role="consumer",
                      timeout_s=3) as be:
        with pytest.raises(BackendConnectionError):
            be.exists(["k"])
        with pytest.raises(BackendConnectionError):
            be.get("k")
        be.release(["k"])  # best effort: never raises


def test_consumer_cannot_save() -> None:
    with open_backend(f"nixl://127.0.0.1:{free_port()}", role="consumer") as be:
        with pytest.raises(ConfigError, match="role='consumer' cannot save"):
            be.put("k", torch.ones(1))


# ------------------------------------------------------------------------- roles in one process
def test_auto_role_serves_after_first_put_and_both_reads_locally() -> None:
    port = free_port()
    writer = open_backend(f"nixl://127.0.0.1:{port}")  # role auto
    try:
        assert not writer.stats()["serving"]
        t = make_tensor((8, 8), torch.bfloat16, seed=5)
        writer.put("mine", t)
        assert writer.stats()["serving"]
        assert same_bits(writer.get("mine"), t)  # its own entry: read from its arena
        with open_backend(f"nixl://127.0.0.1:{port}", role="consumer") as reader:
            assert same_bits(reader.get("mine"), t)  # another backend: a NIXL READ
    finally:
        writer.close()


# ------------------------------------------------------------------------- lifecycle faults
def test_producer_killed_mid_transfer_gives_typed_error_within_timeout() -> None:
    port = free_port()
    producer = start_producer(f"nixl://127.0.0.1:{port}", arena_bytes="128MiB")
    big = torch.zeros(32 << 20, dtype=torch.uint8)
    producer.put("big", big)
    consumer = open_backend(f"nixl://127.0.0.1:{port}", role="consumer", timeout_s=3)
    outcome: list[BaseException] = []
    done = threading.Event()

    def loop() -> None:
        out = torch.empty_like(big)
        try:
            for _ in range(100_000):
                consumer.get_into("big", out)
                assert torch.equal(out, big), "a wrong tensor was returned"
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome.append(exc)
        finally:
            done.set()

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    try:
        time.sleep(0.5)
        producer.proc.kill()
        assert done.wait(3 + SLACK_S), "the consumer did not fail after its producer died"
        assert outcome and isinstance(outcome[0], NETWORK_ERRORS + (EntryNotFoundError,)), outcome
    finally:
        producer.close()
        consumer.close()


def test_consumer_killed_before_release_is_freed_by_the_lease() -> None:
    port = free_port()
    producer = start_producer(f"nixl://127.0.0.1:{port}", arena_bytes="16MiB", lease_s=6)
    try:
        # The consumer's pins last its timeout_s (2 s) unless a later message returns them.
        consumer = RemoteBackend.start(f"nixl://127.0.0.1:{port}?timeout_s=2", timeout_s=60, role="consumer")
        producer.put("warm-up", torch.ones(4))
        consumer.get("warm-up")  # the consumer's NIXL agent exists before the leased entry is saved
        consumer.release(["warm-up"])
        producer.put("leased", make_tensor((256, 256), torch.bfloat16))
        assert consumer.get("leased").shape == (256, 256)
        consumer.proc.kill()  # dies without releasing
        consumer.close()
        assert _wait_for(lambda: producer.call_backend("arena_used_bytes") == 0, 6 + 2 + SLACK_S), \
            producer.call_backend("stats")
        assert producer.exists(["leased"]) == [False]
    finally:
        producer.close()


def test_arena_full_waits_then_fails_clearly() -> None:
    port = free_port()
    with open_backend(f"nixl://127.0.0.1:{port}", role="both", arena_bytes="1MiB", put_wait_s=3) as be:
        chunk = torch.zeros(300_000, dtype=torch.uint8)
        for i in range(3):
            be.put(f"c{i}", chunk)
        with pytest.raises(CapacityError, match="arena is full.*put_wait_s=3"):
            be.put("c3", chunk)
        with pytest.raises(CapacityError, match="larger than the whole nixl arena"):
            be.put("huge", torch.zeros(2 << 20, dtype=torch.uint8))
        # A put waiting for space goes through once a consumer releases an entry.
        with open_backend(f"nixl://127.0.0.1:{port}", role="consumer") as consumer:
            t = threading.Timer(0.2, lambda: consumer.release(["c0"]))
            t.start()
            be.put("c3", chunk)  # waits for c0's release
            t.join()
        assert be.exists(["c0", "c3"]) == [False, True]
        be.release(["c1", "c2", "c3"])
        assert be.arena_used_bytes() == 0


def test_two_producers_one_consumer() -> None:
    ports = [free_port(), free_port()]
    producers = [start_producer(f"nixl://127.0.0.1:{p}", arena_bytes="32MiB") for p in ports]
    url = "nixl://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    try:
        with open_backend(url, role="consumer") as consumer:
            items = {f"img{i}": make_tensor((128, 64), torch.bfloat16, seed=i) for i in range(6)}
            for i, (k, t) in enumerate(items.items()):
                producers[i % 2].put(k, t)
            assert consumer.exists([*items, "nowhere"]) == [True] * 6 + [False]
            got = consumer.get_many(list(items))  # one READ per producer
            for k, g in zip(items, got):
                assert same_bits(g, items[k])
            outs = [torch.empty_like(t) for t in items.values()]
            consumer.get_many_into(list(items), outs)
            assert all(same_bits(o, t) for o, t in zip(outs, items.values()))
            with pytest.raises(EntryNotFoundError):
                consumer.get("nowhere")
            consumer.release(list(items))
            for p in producers:
                assert _wait_for(lambda p=p: p.call_backend("arena_used_bytes") == 0, 10)
    finally:
        for p in producers:
            p.close()


def test_buffer_landing_round_trips_and_frees_its_buffer(fleet: ProducerFleet) -> None:
    writer = fleet.producer("")
    with open_backend(fleet.url(), role="consumer", landing="buffer", recv_buffer_bytes="1MiB") as be:
        t = make_tensor((300, 300), torch.float16, seed=7)
        writer.put("buf", t)
        out = torch.empty_like(t)
        be.get_into("buf", out)
        assert same_bits(out, t) and same_bits(be.get("buf"), t)
        assert be.stats()["recv_used_bytes"] == 0
        writer.put("too-big", torch.zeros(2 << 20, dtype=torch.uint8))
        with pytest.raises(CapacityError, match="recv_buffer_bytes"):
            be.get("too-big")
        be.release(["buf", "too-big"])


def test_hash_beside_reads_large_entries_in_pieces_and_catches_damage(fleet: ProducerFleet,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from ectransfer.backends.nixl import agent as agent_module
    from ectransfer.backends.nixl.config import BESIDE_MIN
    from ectransfer.backends.nixl.consumer import _PIECE

    reads: list[list[int]] = []
    real_read = agent_module.Agent.read

    def counting_read(self: Any, peer: str, local: Any, remote: Any, **kw: Any) -> None:
        reads.append([n for _, n, _ in remote])
        real_read(self, peer, local, remote, **kw)

    monkeypatch.setattr(agent_module.Agent, "read", counting_read)
    writer = fleet.producer("")
    big = make_tensor((BESIDE_MIN + 1234,), torch.uint8, seed=8)  # not a whole number of pieces
    small = make_tensor((100, 30), torch.bfloat16, seed=9)
    pieces = -(-big.numel() // _PIECE)
    assert pieces >= 3
    writer.put("big", big)
    writer.put("small", small)
    with open_backend(fleet.url(), role="consumer", hash_beside="on", exists_cache_s=0) as be:
        outs = [torch.empty_like(big), torch.empty_like(small)]
        be.get_many_into(["big", "small"], outs)
        assert same_bits(outs[0], big) and same_bits(outs[1], small)
        assert [len(r) for r in reads] == [1] * (1 + pieces), reads  # the small one, then big piece by piece
        assert sum(n for r in reads[1:] for n in r) == big.numel()
        stored = fleet.call("", "entry_bytes", "big")
        for where in (len(stored) - 1, len(stored) - big.numel()):  # last byte of the last / first piece
            damaged = bytearray(stored)
            damaged[where] ^= 0x40
            fleet.call("", "store_entry_bytes", "big", bytes(damaged))
            with pytest.raises(CorruptEntryError, match="checksum"):
                be.get_into("big", outs[0])
        be.release(["big", "small"])


def test_hash_beside_producer_seals_what_it_copied() -> None:
    """A producer with hash_beside=on hashes large entries on a second thread as it copies them
    into its arena: a consumer that verifies in one pass (off) gets them bit-exact."""
    url = f"nixl://127.0.0.1:{free_port()}"
    big = make_tensor((5 << 20,), torch.uint8, seed=10)
    with open_backend(url, role="producer", arena_bytes="16MiB", hash_beside="on") as prod, \
            open_backend(url, role="consumer", hash_beside="off", exists_cache_s=0) as cons:
        assert prod.config.hashes_beside and not cons.config.hashes_beside
        prod.put("big", big)
        assert same_bits(cons.get("big"), big)
        cons.release(["big"])


# ------------------------------------------------------------------------- raw baseline
@pytest.mark.parametrize("peer_process", [False, True], ids=["peer-in-process", "peer-process"])
def test_raw_baseline_moves_the_same_bytes(peer_process: bool) -> None:
    from ectransfer.bench.raw.nixl import Raw
    from ectransfer.codec import payload_view

    raw = Raw("nixl://127.0.0.1:1", {"arena_bytes": "4MiB"}, peer_process=peer_process)
    pusher = Raw("nixl://127.0.0.1:1", {"arena_bytes": "4MiB"}, peer_process=peer_process, push=True)
    try:
        data = make_tensor((1 << 20,), torch.uint8, seed=3)
        raw.write("k", payload_view(data))
        out = torch.zeros_like(data)
        raw.read_into("k", payload_view(out))
        assert same_bits(out, data)
        with pytest.raises(ValueError, match="push=True"):
            raw.push_into("k", payload_view(out))
        pusher.write("k", payload_view(data))
        pushed = torch.zeros_like(data)
        pusher.push_into("k", payload_view(pushed))
        assert same_bits(pushed, data)
        for i in range(8):  # deleting frees the peer's space for the next items
            raw.delete(f"x{i - 1}")
            raw.write(f"x{i}", payload_view(data))
        with pytest.raises(CapacityError):
            raw.write("too-big", payload_view(torch.zeros(8 << 20, dtype=torch.uint8)))
    finally:
        pusher.close()
        raw.close()
