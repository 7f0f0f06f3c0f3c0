"""mooncake backend against a real ``mooncake_master`` and a segment-holder process on loopback.

The conformance kit runs twice: writer and reader as two backends of this process, and with
the reader in another process (``RemoteBackend``). Entries always live in the holder's memory,
so every round trip crosses a process boundary over TCP. Then Mooncake-specific
behaviour: options, the staging-buffer bound, overwrites, the error-code table, and the master
or the holder dying under a client.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
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
    ECTransferError,
    EntryNotFoundError,
    IncompatibleTensorError,
    TransferTimeoutError,
    open_backend,
)
from ectransfer.backend import Backend
from ectransfer.backends.mooncake import MooncakeBackend
from ectransfer.testing import BackendTests, error_within, make_tensor, same_bits

ok, why = MooncakeBackend.is_available()
pytestmark = pytest.mark.skipif(not ok, reason=f"mooncake backend not available: {why}")

from ectransfer.testing.servers.mooncake import (  # noqa: E402 - after the availability check
    MooncakeServer,
    kill_holder,
    rewrite_entry,
    spawn,
)

BUFFER = "32MiB"  # each open registers this much; the kit opens several backends per test
BOUND_S = 20.0  # "no hang": far above every timeout used here, far below a hung test's 300 s


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MooncakeServer]:
    srv = spawn(tmp_path_factory.mktemp("mooncake"), segment_size=512 << 20)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}/"


def _open(server: MooncakeServer, **options: Any) -> Backend[Any]:
    return open_backend(server.url, **{**server.options, "local_buffer_size": BUFFER, "timeout_s": 30, **options})


@pytest.fixture(scope="module")
def warm(server: MooncakeServer) -> Iterator[Backend[Any]]:
    """One backend open for the whole module: the Mooncake client it shares with every backend
    opened with the same settings stays up (closing a client holds the GIL for a second)."""
    be = _open(server)
    yield be
    be.close()


class _Corrupt:
    def corrupt(self, backend: Backend[Any], key: str, mutate: Callable[[bytes], bytes]) -> None:
        assert isinstance(backend, MooncakeBackend)
        try:
            rewrite_entry(backend, key, mutate)
        except ValueError as exc:
            pytest.skip(str(exc))


class TestMooncake(_Corrupt, BackendTests):
    """Writer and reader are two backends of this process; entries live in the holder."""

    @pytest.fixture
    def backend_factory(self, server: MooncakeServer, warm: Backend[Any]) -> Callable[..., Backend[Any]]:
        prefix = f"t{uuid.uuid4().hex[:8]}/"  # a new prefix per test: an empty store
        return lambda **opts: _open(server, key_prefix=prefix, **opts)

    @pytest.fixture
    def reader(self, open_backend: Callable[..., Backend[Any]]) -> Backend[Any]:
        return open_backend()


@pytest.fixture(scope="module")
def remote_reader(server: MooncakeServer, prefix: str) -> Iterator[Any]:
    from ectransfer.testing.remote import RemoteBackend

    r = RemoteBackend.start(server.url, timeout_s=60, **{**server.options, "local_buffer_size": BUFFER,
                                                          "key_prefix": prefix})
    yield r
    r.close()


class TestMooncakeReadByAnotherProcess(_Corrupt, BackendTests):
    """The reader is a RemoteBackend in a child process: producer and consumer are two processes."""

    @pytest.fixture
    def backend_factory(self, server: MooncakeServer, prefix: str, warm: Backend[Any]) -> Callable[..., Backend[Any]]:
        assert isinstance(warm, MooncakeBackend)
        warm._store.remove_all(True)  # every test starts from an empty store
        return lambda **opts: _open(server, key_prefix=prefix, **opts)

    @pytest.fixture
    def reader(self, backend: Backend[Any], remote_reader: Any) -> Any:
        return remote_reader


# ----------------------------------------------------------------------------- options and URLs
@pytest.mark.parametrize("options, match", [
    ({"metadata_server": "zookeeper://x"}, "metadata_server"),
    ({"protocol": "udp"}, "protocol"),
    ({"device_name": "mlx5_0"}, "device_name"),
    ({"protocol": "rdma", "device_name": "mlx5_0;rm -rf"}, "device_name"),
    ({"local_hostname": "bad host"}, "local_hostname"),
    ({"global_segment_size": 100}, "global_segment_size"),
    ({"global_segment_size": "lots"}, "global_segment_size"),
    ({"local_buffer_size": 0}, "local_buffer_size"),
    ({"local_buffer_size": "1MiB", "max_item_size": "4MiB"}, "local_buffer_size"),
    ({"max_item_size": 0}, "max_item_size"),
    ({"replica_num": 0}, "replica_num"),
    ({"key_prefix": "a b"}, "key_prefix"),
    ({"io_threads": 0}, "io_threads"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"colour": "red"}, "colour"),
])
def test_bad_options_name_the_option(options: dict[str, Any], match: str) -> None:
    # Validation happens before any connection: the port need not be listening.
    with pytest.raises(ConfigError, match=match):
        open_backend("mooncake://127.0.0.1:1", **options)


@pytest.mark.parametrize("url, match", [
    ("mooncake://", "no master host"),
    ("mooncake://host:99999", "port"),
    ("mooncake://host:50051/path", "only the master"),
    ("mooncake://user:secret@host:50051", "only the master"),
])
def test_bad_urls(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        open_backend(url)
    assert "secret" not in str(info.value)


def test_url_forms() -> None:
    from ectransfer.backends.mooncake import MooncakeConfig

    assert MooncakeConfig.from_url("mooncake://10.0.0.5", {}).master == "10.0.0.5:50051"
    assert MooncakeConfig.from_url("mooncake://[::1]:6000", {}).master == "[::1]:6000"
    cfg = MooncakeConfig.from_url("mooncake://h:7", {"local_buffer_size": "1GiB", "protocol": "rdma",
                                                      "device_name": "mlx5_0,mlx5_1"})
    assert (cfg.master, cfg.local_buffer_size, cfg.device_name) == ("h:7", 1 << 30, "mlx5_0,mlx5_1")


def test_query_parameters_are_options(server: MooncakeServer) -> None:
    with open_backend(f"{server.url}?local_buffer_size=8MiB&replica_num=1", **server.options) as be:
        assert be.config.local_buffer_size == 8 << 20


def test_http_metadata_server_mode(tmp_path: Path) -> None:
    """Peers found through the master's embedded HTTP metadata server instead of P2PHANDSHAKE."""
    from ectransfer.testing.remote import RemoteBackend

    srv = spawn(tmp_path, segment_size=64 << 20, http_metadata=True)
    try:
        assert srv.options["metadata_server"].startswith("http://127.0.0.1:")
        t = make_tensor((64, 128), torch.bfloat16, seed=3)
        with _open(srv) as writer:
            writer.put("via-http", t)
            reader = RemoteBackend.start(srv.url, timeout_s=60, **{**srv.options, "local_buffer_size": BUFFER})
            try:
                assert same_bits(reader.get("via-http"), t)
            finally:
                reader.close()
    finally:
        srv.stop()


def test_server_absent_fails_fast() -> None:
    from ectransfer.testing.servers import free_port

    with pytest.raises(BackendConnectionError, match="cannot reach mooncake_master"):
        open_backend(f"mooncake://127.0.0.1:{free_port()}", timeout_s=5)


# ----------------------------------------------------------------------------- capacity
def test_item_larger_than_local_buffer_is_refused(server: MooncakeServer) -> None:
    with _open(server, local_buffer_size="1MiB") as be:
        with pytest.raises(CapacityError, match="local_buffer_size"):
            be.put("huge", torch.zeros(2 << 20, dtype=torch.uint8))
        assert be.exists(["huge"]) == [False]
        with pytest.raises(CapacityError, match="local_buffer_size"):
            be.put_many({"ok": torch.zeros(10), "huge": torch.zeros(2 << 20, dtype=torch.uint8)})


def test_reader_with_smaller_buffer_gets_a_clear_error(server: MooncakeServer) -> None:
    big = make_tensor((3 << 20,), torch.uint8, seed=1)
    with _open(server) as writer, _open(server, local_buffer_size="1MiB") as reader:
        writer.put("big-entry", big)
        calls: list[Callable[[], Any]] = [lambda: reader.get("big-entry"), lambda: reader.get_many(["big-entry"]),
                                          lambda: reader.get_into("big-entry", torch.empty_like(big))]
        for call in calls:
            with pytest.raises(CapacityError, match="local_buffer_size"):
                call()


def test_batches_larger_than_the_buffer_are_split(server: MooncakeServer) -> None:
    items = {f"chunk{i}": make_tensor((300 << 10,), torch.uint8, seed=i) for i in range(8)}  # 2.4 MB in all
    with _open(server, local_buffer_size="1MiB") as be:
        be.put_many(items)
        for k, got in zip(items, be.get_many(list(items))):
            assert same_bits(got, items[k])
        outs = [torch.empty_like(t) for t in items.values()]
        be.get_many_into(list(items), outs)
        assert all(same_bits(o, t) for o, t in zip(outs, items.values()))


def test_no_segment_mounted_is_a_capacity_error(tmp_path: Path) -> None:
    srv = spawn(tmp_path, segment_size=0)  # a master and no memory at all
    try:
        with _open(srv, timeout_s=10) as be:
            with pytest.raises(CapacityError, match="mount more memory") as info:
                be.put("k", torch.ones(4))
            assert (info.value.code, info.value.code_name) == (-200, "NO_AVAILABLE_HANDLE")  # type: ignore[attr-defined]
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- overwrite
@pytest.mark.parametrize("second", ["same_size", "larger", "smaller"])
def test_overwrite_replaces_across_processes(server: MooncakeServer, second: str) -> None:
    """Mooncake's put keeps the old value; the backend must replace it (in place when same size)."""
    from ectransfer.testing.remote import RemoteBackend

    a = make_tensor((64, 64), torch.bfloat16, seed=1)
    b = {"same_size": make_tensor((64, 64), torch.bfloat16, seed=2),
         "larger": make_tensor((128, 64), torch.float32, seed=3),
         "smaller": make_tensor((5,), torch.int8, seed=4)}[second]
    with _open(server) as writer:
        reader = RemoteBackend.start(server.url, timeout_s=60, **{**server.options, "local_buffer_size": BUFFER})
        try:
            writer.put(f"ow-{second}", a)
            assert same_bits(reader.get(f"ow-{second}"), a)
            writer.put(f"ow-{second}", b)
            assert same_bits(reader.get(f"ow-{second}"), b)
        finally:
            reader.close()


def test_put_many_with_a_repeated_key_keeps_the_last(server: MooncakeServer) -> None:
    with _open(server) as be:
        be.put_many([("rep", torch.full((8,), 1.0)), ("other", torch.ones(2)), ("rep", torch.full((8,), 2.0))])
        assert torch.equal(be.get("rep"), torch.full((8,), 2.0))


def test_get_many_into_reports_mismatches(server: MooncakeServer) -> None:
    with _open(server) as be:
        be.put_many({"m1": torch.ones(4), "m2": torch.ones(1000)})
        with pytest.raises(IncompatibleTensorError):
            be.get_many_into(["m1", "m2"], [torch.empty(4), torch.empty(10)])
        with pytest.raises(EntryNotFoundError):
            be.get_many_into(["m1", "absent"], [torch.empty(4), torch.empty(4)])


def test_entries_are_isolated_by_key_prefix(server: MooncakeServer) -> None:
    with _open(server, key_prefix="app-a/") as a, _open(server, key_prefix="app-b/") as b:
        a.put("same", torch.ones(3))
        assert b.exists(["same"]) == [False]
        assert isinstance(a, MooncakeBackend) and a.mooncake_key("same") == "app-a/same"


def test_checksum_failure_is_never_returned(server: MooncakeServer) -> None:
    """A payload rewritten behind the backend's back fails every re-read: CorruptEntryError."""
    t = make_tensor((32, 32), torch.float16, seed=7)
    with _open(server) as be:
        be.put("victim", t)
        assert isinstance(be, MooncakeBackend)
        rewrite_entry(be, "victim", lambda blob: blob[:-1] + bytes([blob[-1] ^ 1]))
        out = torch.zeros_like(t)
        with pytest.raises(CorruptEntryError, match="checksum"):
            be.get_into("victim", out)
        assert torch.count_nonzero(out.view(torch.int16)) == 0, "get_into wrote a corrupt payload into out"


# ----------------------------------------------------------------------------- error codes
def test_error_code_table() -> None:
    from ectransfer.backends.mooncake.codes import ERROR_CODES, code_name, error_for

    expected = {-704: EntryNotFoundError, -600: CapacityError, -200: CapacityError, -800: BackendConnectionError,
                -900: BackendConnectionError, -901: TransferTimeoutError, -801: CorruptEntryError,
                -103: BackendConnectionError, -707: TransferTimeoutError}
    for code, cls in expected.items():
        assert ERROR_CODES[code][1] is cls, code
    names = [name for name, _ in ERROR_CODES.values()]
    assert len(set(names)) == len(names) and all(c < 0 for c in ERROR_CODES)
    for code, (name, cls) in ERROR_CODES.items():
        exc = error_for(code, "get 'k'")
        assert type(exc) is cls and issubclass(cls, ECTransferError)
        assert (exc.code, exc.code_name) == (code, name)  # type: ignore[attr-defined]
        assert str(code) in str(exc) and name in str(exc) and "'k'" in str(exc)
        assert code_name(code) == name
    unknown = error_for(-4242, "put 'k'")
    assert type(unknown).__name__ == "StorageIOError" and "UNKNOWN" in str(unknown)
    assert isinstance(error_for(-1, "setup", as_class=BackendConnectionError), BackendConnectionError)


def test_real_error_codes_carry_code_and_name(server: MooncakeServer) -> None:
    with _open(server) as be:
        with pytest.raises(EntryNotFoundError) as info:
            be.get("never-written")
        assert (info.value.code, info.value.code_name) == (-704, "OBJECT_NOT_FOUND")  # type: ignore[attr-defined]
        with pytest.raises(EntryNotFoundError) as info:
            be.get_into("never-written", torch.empty(3))
        assert info.value.code == -704  # type: ignore[attr-defined]


def test_unavailable_reasons_name_what_to_install() -> None:
    from ectransfer.backends.mooncake.client import why_unavailable as _why_unavailable

    missing = ModuleNotFoundError("No module named 'mooncake'", name="mooncake")
    assert "mooncake-cpu" in _why_unavailable(missing) and "ectransfer[mooncake]" in _why_unavailable(missing)
    verbs = ImportError("libibverbs.so.1: cannot open shared object file: No such file or directory")
    assert "apt-get install libibverbs1" in _why_unavailable(verbs)
    cuda = ImportError("libcudart.so.12: cannot open shared object file")
    assert "mooncake-cpu" in _why_unavailable(cuda)


# ----------------------------------------------------------------------------- processes dying


def test_master_killed_gives_typed_errors_without_hanging(tmp_path: Path) -> None:
    srv = spawn(tmp_path, segment_size=64 << 20)
    try:
        be = _open(srv, timeout_s=3)
        t = make_tensor((256, 256), torch.bfloat16, seed=2)
        be.put("k", t)
        srv.master.kill()
        out = torch.zeros_like(t)
        calls: list[Callable[[], Any]] = [lambda: be.get("k"), lambda: be.get_into("k", out), lambda: be.put("k2", t),
                                          lambda: be.exists(["k"]), lambda: be.delete(["k"]),
                                          lambda: be.put_many({"a": t}), lambda: be.get_many(["k"])]
        for call in calls:
            exc = error_within(call, BOUND_S)
            assert isinstance(exc, (BackendConnectionError, TransferTimeoutError)), repr(exc)
        assert torch.count_nonzero(out.view(torch.int16)) == 0
        assert error_within(be.close, BOUND_S) is None
    finally:
        srv.stop()


def test_holder_killed_gives_an_error_or_a_miss_never_a_wrong_tensor(tmp_path: Path) -> None:
    srv = spawn(tmp_path, segment_size=64 << 20)
    try:
        with _open(srv, timeout_s=5) as be:
            t = make_tensor((512, 512), torch.bfloat16, seed=5)
            be.put("held", t)
            assert same_bits(be.get("held"), t)
            kill_holder(srv)
            for _ in range(3):
                out = torch.zeros_like(t)

                def load(o: torch.Tensor = out) -> None:
                    be.get_into("held", o)

                exc = error_within(load, BOUND_S)
                assert isinstance(exc, (BackendConnectionError, EntryNotFoundError, TransferTimeoutError)), repr(exc)
                assert torch.count_nonzero(out.view(torch.int16)) == 0, "a failed get wrote into the caller's tensor"
            exc = error_within(lambda: be.get("held"), BOUND_S)
            assert isinstance(exc, (BackendConnectionError, EntryNotFoundError, TransferTimeoutError)), repr(exc)
    finally:
        srv.stop()


def test_stalled_master_times_out_and_never_writes_late(tmp_path: Path) -> None:
    """A frozen master (SIGSTOP): calls end with TransferTimeoutError; an abandoned call keeps
    its staging slot, so the caller's tensor stays untouched after the master resumes.

    (A TCP proxy in this process cannot stand in for the stall: Mooncake's setup() holds the
    GIL while it talks to the master, so a Python proxy thread could not forward its bytes.)
    """
    srv = spawn(tmp_path, segment_size=64 << 20)
    t = make_tensor((128, 128), torch.float32, seed=9)
    be = _open(srv, timeout_s=2)
    try:
        be.put("slow", t)
        os.kill(srv.master.pid, signal.SIGSTOP)
        try:
            out = torch.zeros_like(t)
            for call in (lambda: be.get_into("slow", out), lambda: be.exists(["slow"]), lambda: be.put("other", t)):
                exc = error_within(call, BOUND_S)
                assert isinstance(exc, TransferTimeoutError), repr(exc)
        finally:
            os.kill(srv.master.pid, signal.SIGCONT)
        assert isinstance(be, MooncakeBackend) and be._arena is not None
        deadline = time.monotonic() + BOUND_S
        while be._arena.free_bytes < be._arena.capacity:  # an abandoned call still holds its slot
            assert time.monotonic() < deadline, "an abandoned call never returned its staging slot"
            time.sleep(0.05)
        assert torch.count_nonzero(out) == 0, "an abandoned call wrote into the caller's tensor"
        assert same_bits(be.get("slow"), t)  # the slots came back: the backend still works
    finally:
        error_within(be.close, BOUND_S)
        srv.stop()


def test_backend_is_usable_from_many_threads(server: MooncakeServer) -> None:
    """io_threads workers and the staging buffer shared by concurrent callers (1 MiB buffer)."""
    errors: list[BaseException] = []
    with _open(server, local_buffer_size="1MiB", io_threads=2) as be:
        def work(w: int) -> None:
            try:
                for i in range(8):
                    t = make_tensor((100 << 10,), torch.uint8, seed=w * 10 + i)
                    be.put(f"mt{w}-{i}", t)
                    assert same_bits(be.get(f"mt{w}-{i}"), t)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
    assert not errors, errors[0]


def test_default_local_hostname_is_the_route_to_the_master(monkeypatch: pytest.MonkeyPatch) -> None:
    from ectransfer.backends.mooncake.client import local_address as _local_address

    monkeypatch.delenv("MC_TCP_BIND_ADDRESS", raising=False)
    assert _local_address("127.0.0.1", 50051) == "127.0.0.1"
    monkeypatch.setenv("MC_TCP_BIND_ADDRESS", "10.1.2.3")  # what Mooncake itself advertises
    assert _local_address("127.0.0.1", 50051) == "10.1.2.3"
