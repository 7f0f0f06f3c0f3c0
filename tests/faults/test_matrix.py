"""The fault matrix: every fault against every backend target (docs/reliability.md).

Each test is one cell; it states what it observed through ``observe`` so the rendered table
reports behaviour, not just pass/fail. Faults a backend cannot have (no server to kill for fs)
skip with the reason, shown as "n/a" in the table.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from ectransfer import (
    BackendConnectionError,
    CorruptEntryError,
    ECTransferError,
    EntryNotFoundError,
    InvalidKeyError,
    TransferTimeoutError,
)
from ectransfer.testing import MUTATIONS, eventually, make_tensor, same_bits
from ectransfer.testing.proxy import StallingProxy
from tests.faults.targets import Target

TIMEOUT_S = 3.0
SLACK_S = 5.0  # scheduling slack on a loaded 2-core machine; the bound is what matters
NETWORK_ERRORS = (BackendConnectionError, TransferTimeoutError)


def _server_only(target: Target) -> None:
    if not target.has_server:
        pytest.skip(f"{target.name} has no server process")


# ----------------------------------------------------------------------------- corruption
@pytest.mark.fault("corrupt payload (flipped byte)")
def test_flipped_byte(target: Target, observe: Any) -> None:
    _corruption_case(target, observe, "flipped_payload_byte")


@pytest.mark.fault("truncated payload")
def test_truncated(target: Target, observe: Any) -> None:
    _corruption_case(target, observe, "truncated")


@pytest.mark.fault("header lying about shape")
def test_lying_shape(target: Target, observe: Any) -> None:
    _corruption_case(target, observe, "lying_shape_header")


@pytest.mark.fault("header lying about dtype")
def test_lying_dtype(target: Target, observe: Any) -> None:
    _corruption_case(target, observe, "wrong_dtype_header")


def _corruption_case(target: Target, observe: Any, mutation: str) -> None:
    be = target.open(timeout_s=TIMEOUT_S)
    try:
        t = make_tensor((64, 48), torch.bfloat16, seed=1)
        be.put("victim", t)
        target.corrupt(be, "victim", MUTATIONS[mutation])
        with pytest.raises(CorruptEntryError) as info:
            be.get("victim")
        out = torch.empty_like(t)
        with pytest.raises(CorruptEntryError):
            be.get_into("victim", out)
        observe(f"CorruptEntryError ({str(info.value)[:60]})")
    finally:
        be.close()


@pytest.mark.fault("entry replaced between exists and get")
def test_replaced_between_exists_and_get(target: Target, observe: Any) -> None:
    writer, reader = target.open(timeout_s=TIMEOUT_S), target.open(timeout_s=TIMEOUT_S)
    try:
        a = make_tensor((32, 32), torch.float16, seed=1)
        b = make_tensor((16, 8, 4), torch.float32, seed=2)
        writer.put("k", a)
        assert reader.exists(["k"]) == [True]
        writer.put("k", b)  # replaced after the reader decided to fetch
        got = reader.get("k")
        assert same_bits(got, b), "the reader must get the complete new version"
        target.corrupt(writer, "k", MUTATIONS["flipped_payload_byte"])
        with pytest.raises(CorruptEntryError):
            reader.get("k")
        observe("new version, complete; a corrupt replacement → CorruptEntryError")
    finally:
        writer.close()
        reader.close()


# ----------------------------------------------------------------------------- keys, namespaces
@pytest.mark.fault("invalid keys (/, .., NUL, unicode, 10 KB)")
def test_invalid_keys_before_io(target: Target, observe: Any) -> None:
    be = target.open(timeout_s=TIMEOUT_S)
    if target.has_server:
        target.kill_server()  # from here on, any I/O would fail with a connection error instead
    try:
        for key in ("a/b", "..", "nul\x00key", "caf\u00e9", "k" * 10_000):
            for call in (lambda k=key: be.put(k, torch.ones(2)), lambda k=key: be.get(k),
                         lambda k=key: be.exists([k]), lambda k=key: be.delete([k])):
                with pytest.raises(InvalidKeyError):
                    call()
        observe("InvalidKeyError before any I/O")
    finally:
        be.close()


@pytest.mark.fault("two models sharing a store (namespaces)")
def test_namespaces(target: Target, observe: Any) -> None:
    a = target.open(namespace="model-a", timeout_s=TIMEOUT_S)
    b = target.open(namespace="model-b", timeout_s=TIMEOUT_S)
    try:
        a.put("same-hash", torch.full((4, 4), 1.0))
        assert b.exists(["same-hash"]) == [False]
        with pytest.raises(EntryNotFoundError):
            b.get("same-hash")
        b.put("same-hash", torch.full((4, 4), 2.0))
        assert torch.equal(a.get("same-hash"), torch.full((4, 4), 1.0))
        observe("isolated: each model reads only its own entry")
    finally:
        a.close()
        b.close()


# ----------------------------------------------------------------------------- concurrency
@pytest.mark.fault("duplicate put")
def test_duplicate_put(target: Target, observe: Any) -> None:
    be = target.open(timeout_s=TIMEOUT_S)
    try:
        t = make_tensor((10, 10), torch.bfloat16)
        be.put("dup", t)
        be.put("dup", t)
        assert same_bits(be.get("dup"), t)
        be.delete(["dup"])
        assert be.exists(["dup"]) == [False]
        observe("idempotent; one delete removes it")
    finally:
        be.close()


@pytest.mark.fault("concurrent put/get of one key from several processes")
def test_multiprocess_same_key(target: Target, observe: Any) -> None:
    if not target.shared_across_processes:
        pytest.skip(f"{target.name}: {target.not_shared_reason}")
    from ectransfer.testing.remote import RemoteBackend

    procs = [RemoteBackend.start(target.url(), timeout_s=60, **target.options()) for _ in range(3)]
    w1, w2, r = procs
    shape = (128, 512)
    errors: list[BaseException] = []
    w1.put("hot", torch.full(shape, 1, dtype=torch.int16))

    def write(be: Any, v: int) -> None:
        try:
            for _ in range(10):
                be.put("hot", torch.full(shape, v, dtype=torch.int16))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    seen: set[int] = set()
    threads = [threading.Thread(target=write, args=(w1, 1)), threading.Thread(target=write, args=(w2, 2))]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            vals = torch.unique(r.get("hot"))
            assert vals.numel() == 1, f"torn read across processes: {vals.tolist()[:4]}"
            seen.add(int(vals[0]))
    finally:
        for t in threads:
            t.join(60)
        for p in procs:
            p.close()
    assert not errors, errors[0]
    observe(f"reader always got one complete version (saw {sorted(seen)})")


# ----------------------------------------------------------------------------- server faults
@pytest.mark.fault("server absent at start")
def test_server_absent(target: Target, observe: Any) -> None:
    _server_only(target)
    from ectransfer import open_backend

    url, opts = target.unreachable_url()
    t0 = time.monotonic()
    with pytest.raises(NETWORK_ERRORS) as info:
        be = open_backend(url, **{**opts, "timeout_s": TIMEOUT_S})
        try:
            be.exists(["k"])
        finally:
            be.close()
    assert time.monotonic() - t0 < TIMEOUT_S + SLACK_S
    observe(f"{type(info.value).__name__} in {time.monotonic() - t0:.1f} s")


@pytest.mark.fault("server killed mid-put")
def test_killed_mid_put(target: Target, observe: Any) -> None:
    _server_only(target)
    be = target.open(timeout_s=TIMEOUT_S)
    big = torch.zeros(8 << 20, dtype=torch.uint8)
    outcome: list[BaseException] = []
    done = threading.Event()

    def loop() -> None:
        try:
            for i in range(10_000):
                be.put(f"big{i % 4}", big)
        except BaseException as exc:  # noqa: BLE001
            outcome.append(exc)
        finally:
            done.set()

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    target.kill_server()
    assert done.wait(TIMEOUT_S + SLACK_S), "put did not end after the server died"
    try:
        assert outcome and isinstance(outcome[0], ECTransferError), outcome
        assert isinstance(outcome[0], NETWORK_ERRORS), outcome
        observe(f"{type(outcome[0]).__name__} after {time.monotonic() - t0:.1f} s")
    finally:
        be.close()


@pytest.mark.fault("server killed mid-get")
def test_killed_mid_get(target: Target, observe: Any) -> None:
    _server_only(target)
    be = target.open(timeout_s=TIMEOUT_S)
    big = torch.zeros(8 << 20, dtype=torch.uint8)
    be.put("big", big)
    outcome: list[BaseException] = []
    done = threading.Event()

    def loop() -> None:
        try:
            for _ in range(10_000):
                got = be.get("big")
                assert torch.equal(got, big), "a wrong tensor was returned"
        except BaseException as exc:  # noqa: BLE001
            outcome.append(exc)
        finally:
            done.set()

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    target.kill_server()
    assert done.wait(TIMEOUT_S + SLACK_S), "get did not end after the server died"
    try:
        assert outcome and isinstance(outcome[0], NETWORK_ERRORS + (EntryNotFoundError,)), outcome
        observe(f"{type(outcome[0]).__name__} after {time.monotonic() - t0:.1f} s, never a wrong tensor")
    finally:
        be.close()


@pytest.mark.fault("server restarted")
def test_server_restarted(target: Target, observe: Any) -> None:
    _server_only(target)
    be = target.open(timeout_s=TIMEOUT_S)
    try:
        be.put("before", torch.ones(4))
        target.kill_server()
        with pytest.raises(NETWORK_ERRORS + (EntryNotFoundError,)):
            be.get("before")
        target.restart_server()
        eventually(lambda: be.put("after", torch.full((4,), 3.0)), NETWORK_ERRORS, TIMEOUT_S + SLACK_S)
        assert torch.equal(be.get("after"), torch.full((4,), 3.0))
        observe("typed error while down; reconnects after restart")
    finally:
        be.close()


@pytest.mark.fault("slow server (stalled connection)")
def test_stalled_server(target: Target, observe: Any) -> None:
    _server_only(target)
    from ectransfer import open_backend

    proxies: list[StallingProxy] = []

    def proxy_for(port: int) -> int:
        p = StallingProxy(port)
        proxies.append(p)
        return p.port

    url, opts = target.proxied(proxy_for)
    be = open_backend(url, **{**opts, "timeout_s": TIMEOUT_S})
    try:
        be.put("k", torch.ones(1024))
        for p in proxies:
            p.stall()
        t0 = time.monotonic()
        with pytest.raises(NETWORK_ERRORS) as info:
            be.get("k")
        elapsed = time.monotonic() - t0
        assert elapsed < TIMEOUT_S + SLACK_S, f"stalled call took {elapsed:.1f} s"
        observe(f"{type(info.value).__name__} after {elapsed:.1f} s (timeout_s={TIMEOUT_S})")
    finally:
        for p in proxies:
            p.resume()
        be.close()
        for p in proxies:
            p.close()
