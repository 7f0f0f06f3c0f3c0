"""fs backend: the conformance kit on a temp dir and on /dev/shm, plus fs-specific behaviour."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from ectransfer import CapacityError, ConfigError, CorruptEntryError, EntryNotFoundError, open_backend
from ectransfer.backend import Backend
from ectransfer.backends.fs import ENTRY_FILE, FsBackend, FsConfig
from ectransfer.testing import BackendTests, make_tensor, same_bits


class _FsCorrupt:
    def corrupt(self, backend: Backend[Any], key: str, mutate: Callable[[bytes], bytes]) -> None:
        assert isinstance(backend, FsBackend)
        path = backend.entry_path(backend._skey(key))
        path.write_bytes(mutate(path.read_bytes()))


class TestFsTmp(_FsCorrupt, BackendTests):
    @pytest.fixture
    def backend_factory(self, tmp_path: Path) -> Callable[..., Backend[Any]]:
        return lambda **opts: open_backend(f"file://{tmp_path}", **opts)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="/dev/shm is not available on this machine")
class TestFsDevShm(_FsCorrupt, BackendTests):
    @pytest.fixture
    def backend_factory(self, tmp_path: Path) -> Any:
        import shutil
        import tempfile

        root = tempfile.mkdtemp(prefix="ectransfer-test-", dir="/dev/shm")
        yield lambda **opts: open_backend(root, **opts)
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------- vLLM layout interop
def test_reads_entry_written_like_vllm_example_connector(tmp_path: Path) -> None:
    """ECExampleConnector writes {"ec_cache": t} with safetensors.save_file, no metadata."""
    t = make_tensor((9, 64), torch.bfloat16, seed=3)
    (tmp_path / "mmhash-1").mkdir()
    save_file({"ec_cache": t}, str(tmp_path / "mmhash-1" / "encoder_cache.safetensors"))
    with open_backend(f"file://{tmp_path}") as be:
        assert be.exists(["mmhash-1"]) == [True]
        assert same_bits(be.get("mmhash-1"), t)


def test_refuses_foreign_entry_when_asked(tmp_path: Path) -> None:
    (tmp_path / "k").mkdir()
    save_file({"ec_cache": torch.ones(3)}, str(tmp_path / "k" / ENTRY_FILE))
    with open_backend(f"file://{tmp_path}", accept_foreign=False) as be:
        with pytest.raises(CorruptEntryError, match="no ectransfer checksum"):
            be.get("k")


def test_written_entry_loads_with_plain_safetensors(tmp_path: Path) -> None:
    t = make_tensor((5, 7, 3), torch.float16, seed=4)
    with open_backend(str(tmp_path)) as be:
        be.put("mmhash-2", t)
    loaded = load_file(str(tmp_path / "mmhash-2" / "encoder_cache.safetensors"))
    assert list(loaded) == ["ec_cache"]
    assert same_bits(loaded["ec_cache"], t)


def test_other_tensor_name_is_not_an_entry(tmp_path: Path) -> None:
    (tmp_path / "k").mkdir()
    save_file({"weights": torch.ones(3)}, str(tmp_path / "k" / ENTRY_FILE))
    with open_backend(str(tmp_path)) as be, pytest.raises(CorruptEntryError, match="exactly one tensor"):
        be.get("k")


# ------------------------------------------------------------------------- atomicity
@pytest.mark.parametrize("fails", ["mid_payload", "sealing_header"])
def test_failed_write_leaves_previous_entry_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        fails: str) -> None:
    """A crash mid-payload or before the header is sealed leaves the old entry and no temp file."""
    be = FsBackend(FsConfig(root=str(tmp_path)))
    old = make_tensor((1024, 1024), torch.float32, seed=1)  # 4 MiB: several payload pieces
    be.put("k", old)
    real_write = os.write

    def failing_write(fd: int, data: Any) -> int:  # half the payload reaches the file, then the disk fails
        real_write(fd, memoryview(data)[: len(data) // 2])
        raise OSError(5, "Input/output error")

    def failing_pwrite(fd: int, data: Any, offset: int) -> int:
        raise OSError(5, "Input/output error")

    if fails == "mid_payload":
        monkeypatch.setattr(os, "write", failing_write)
    else:
        monkeypatch.setattr(os, "pwrite", failing_pwrite)
    with pytest.raises(OSError):
        be.put("k", make_tensor((1024, 1024), torch.float32, seed=2))
    monkeypatch.undo()
    assert same_bits(be.get("k"), old)
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [ENTRY_FILE]


def test_partial_file_is_never_served(tmp_path: Path) -> None:
    """A half-written file at the final name (e.g. copied by hand) is detected."""
    with open_backend(str(tmp_path)) as be:
        be.put("k", make_tensor((64, 64), torch.bfloat16))
        p = tmp_path / "k" / ENTRY_FILE
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        with pytest.raises(CorruptEntryError, match="truncated|promises"):
            be.get("k")


def test_concurrent_writers_and_reader_across_backends(tmp_path: Path) -> None:
    """Two backend instances (as two processes would) write one key while a third reads."""
    w1, w2, r = (open_backend(str(tmp_path)) for _ in range(3))
    w1.put("hot", torch.full((256, 256), 1, dtype=torch.int32))
    errors: list[BaseException] = []

    def write(be: Backend[Any], v: int) -> None:
        for _ in range(20):
            be.put("hot", torch.full((256, 256), v, dtype=torch.int32))

    def read() -> None:
        try:
            for _ in range(60):
                assert torch.unique(r.get("hot")).numel() == 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    ts = [threading.Thread(target=write, args=(w1, 1)), threading.Thread(target=write, args=(w2, 2)),
          threading.Thread(target=read)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors[0]
    for b in (w1, w2, r):
        b.close()


# ------------------------------------------------------------------------- capacity and TTL
def test_max_bytes_evicts_least_recently_used(tmp_path: Path) -> None:
    t = torch.zeros(1024, dtype=torch.uint8)  # ~1.2 KB encoded
    with open_backend(str(tmp_path), max_bytes=4000) as be:
        be.put("a", t)
        be.put("b", t)
        be.put("c", t)
        be.get("a")  # a is now more recent than b
        be.put("d", t)
        assert be.exists(["a", "b", "c", "d"]) == [True, False, True, True]


def test_max_bytes_counts_existing_entries(tmp_path: Path) -> None:
    t = torch.zeros(1024, dtype=torch.uint8)
    with open_backend(str(tmp_path)) as be:
        be.put("old1", t)
        be.put("old2", t)
    with open_backend(str(tmp_path), max_bytes=3000) as be:
        be.put("new", t)
        assert be.exists(["old1", "old2", "new"]) == [False, True, True]


def test_item_larger_than_max_bytes_is_refused(tmp_path: Path) -> None:
    with open_backend(str(tmp_path), max_bytes=1000) as be:
        with pytest.raises(CapacityError, match="max_bytes"):
            be.put("huge", torch.zeros(4096, dtype=torch.uint8))
        assert be.exists(["huge"]) == [False]


def test_ttl_expires_entries(tmp_path: Path) -> None:
    with open_backend(str(tmp_path), ttl_s=60) as be:
        be.put("k", torch.ones(3))
        assert be.exists(["k"]) == [True]
        p = tmp_path / "k" / ENTRY_FILE
        past = time.time() - 120
        os.utime(p, (past, past))
        assert be.exists(["k"]) == [False]
        with pytest.raises(EntryNotFoundError, match="expired"):
            be.get("k")
        assert not p.exists(), "an expired entry is removed when touched"


# ------------------------------------------------------------------------- configuration
def test_url_and_path_forms(tmp_path: Path) -> None:
    for spec in (f"file://{tmp_path}", str(tmp_path), f"file://{tmp_path}?fsync=true&max_bytes=1MiB"):
        with open_backend(spec) as be:
            assert isinstance(be, FsBackend) and be.root == tmp_path
    with open_backend(f"file://{tmp_path}?fsync=true&max_bytes=1MiB") as be:
        assert be.config.fsync is True and be.config.max_bytes == 1 << 20


@pytest.mark.parametrize(
    "options, match",
    [({"fsync": "maybe"}, "fsync"), ({"max_bytes": "lots"}, "max_bytes"), ({"ttl_s": -1}, "ttl_s"),
     ({"colour": "red"}, "colour"), ({"timeout_s": 0}, "timeout_s"), ({"namespace": "a/b"}, "namespace")],
)
def test_bad_options_name_the_option(tmp_path: Path, options: dict[str, Any], match: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=match):
        open_backend(str(tmp_path), **options)


def test_file_url_with_host_is_rejected() -> None:
    with pytest.raises(ConfigError, match="host"):
        open_backend("file://server/share")


def test_fsync_mode_round_trips(tmp_path: Path) -> None:
    with open_backend(str(tmp_path), fsync=True) as be:
        be.put("k", torch.arange(10))
        assert torch.equal(be.get("k"), torch.arange(10))


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("remote")


@pytest.fixture(scope="module")
def remote_reader(shared_root: Path) -> Any:
    from ectransfer.testing.remote import RemoteBackend

    r = RemoteBackend.start(f"file://{shared_root}", timeout_s=60)
    yield r
    r.close()


class TestFsReadByAnotherProcess(_FsCorrupt, BackendTests):
    """The reader is a RemoteBackend in a child process: entries cross a process boundary."""

    @pytest.fixture
    def backend_factory(self, shared_root: Path) -> Callable[..., Backend[Any]]:
        import shutil

        for child in shared_root.iterdir():  # every test starts from an empty store
            shutil.rmtree(child)
        return lambda **opts: open_backend(f"file://{shared_root}", **opts)

    @pytest.fixture
    def reader(self, backend: Backend[Any], remote_reader: Any) -> Any:
        return remote_reader


@pytest.mark.parametrize("damage", ["flip_middle", "flip_last", "truncate"])
def test_large_entry_damage_is_caught_by_the_parallel_verifier(tmp_path: Path, damage: str) -> None:
    """Payloads of several MiB are hashed on a second thread while they are read: still checked."""
    from ectransfer.backends.fs import _PARALLEL_MIN

    t = make_tensor((1024, 3072), torch.bfloat16, seed=7)  # 6 MiB
    assert t.numel() * 2 >= _PARALLEL_MIN
    with open_backend(str(tmp_path)) as be:
        be.put("big", t)
        assert same_bits(be.get("big"), t)
        path = tmp_path / "big" / ENTRY_FILE
        blob = bytearray(path.read_bytes())
        if damage == "truncate":
            del blob[-4096:]
        else:
            blob[len(blob) // 2 if damage == "flip_middle" else -1] ^= 0x01
        path.write_bytes(bytes(blob))
        with pytest.raises(CorruptEntryError):
            be.get("big")
        with pytest.raises(CorruptEntryError):
            be.get_into("big", torch.empty_like(t))
