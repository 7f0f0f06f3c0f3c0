"""fsspec backend: the conformance kit against a real moto_server (S3 over HTTP, another process),
read back by another process too, and against fsspec's ``file`` and ``memory`` filesystems; plus
layout sharing with the fs backend, multipart, clean-up, configuration, faults and secrets."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ectransfer import ConfigError, CorruptEntryError, EntryNotFoundError, open_backend
from ectransfer.backend import Backend
from ectransfer.backends._layout import ENTRY_FILE, TMP_PREFIX
from ectransfer.backends.fs import FsBackend
from ectransfer.codec import encode
from ectransfer.testing import BackendTests, make_tensor, same_bits
from ectransfer.testing.servers import SpawnedServer

s3fs = pytest.importorskip("s3fs", reason="the fsspec backend tests need s3fs: pip install 'ectransfer[s3]'")

from ectransfer.backends.fsspec import FsspecBackend  # noqa: E402
from ectransfer.testing.servers.fsspec import BUCKET, spawn  # noqa: E402


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpawnedServer]:
    server = spawn(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def raw(moto: SpawnedServer) -> Any:
    """Plain s3fs on the same server: reads and rewrites objects behind the backend's back."""
    o = moto.options
    return s3fs.S3FileSystem(endpoint_url=o["endpoint_url"], key=o["key"], secret=o["secret"],
                             skip_instance_cache=True, use_listings_cache=False)


def _s3_url() -> str:
    return f"s3://{BUCKET}/t-{uuid.uuid4().hex[:12]}"  # a fresh prefix: an empty store per test


class _S3Corrupt:
    @pytest.fixture(autouse=True)
    def _raw(self, raw: Any) -> None:
        self.raw = raw

    def corrupt(self, backend: Backend[Any], key: str, mutate: Callable[[bytes], bytes]) -> None:
        assert isinstance(backend, FsspecBackend)
        path = backend.entry_path(backend._skey(key))
        self.raw.pipe_file(path, mutate(self.raw.cat_file(path)))


class TestS3(_S3Corrupt, BackendTests):
    @pytest.fixture
    def backend_factory(self, moto: SpawnedServer) -> Callable[..., Backend[Any]]:
        url = _s3_url()
        return lambda **opts: open_backend(url, **{**moto.options, **opts})


@pytest.fixture(scope="module")
def shared_prefix() -> str:
    return f"s3://{BUCKET}/remote"


@pytest.fixture(scope="module")
def remote_reader(moto: SpawnedServer, shared_prefix: str) -> Iterator[Any]:
    from ectransfer.testing.remote import RemoteBackend

    r = RemoteBackend.start(shared_prefix, timeout_s=60, **moto.options)
    yield r
    r.close()


class TestS3ReadByAnotherProcess(_S3Corrupt, BackendTests):
    """The reader is a RemoteBackend in a child process, opened from the spawned URL + options."""

    @pytest.fixture
    def backend_factory(self, moto: SpawnedServer, raw: Any, shared_prefix: str) -> Callable[..., Backend[Any]]:
        leftovers = raw.find(shared_prefix.removeprefix("s3://"))
        if leftovers:  # every test starts from an empty store
            raw.rm(leftovers)
        return lambda **opts: open_backend(shared_prefix, **{**moto.options, **opts})

    @pytest.fixture
    def reader(self, backend: Backend[Any], remote_reader: Any) -> Any:
        return remote_reader


class TestFileProtocol(BackendTests):
    @pytest.fixture
    def backend_factory(self, tmp_path: Path) -> Callable[..., Backend[Any]]:
        return lambda **opts: open_backend(f"file://{tmp_path}", backend="fsspec", **opts)

    def corrupt(self, backend: Backend[Any], key: str, mutate: Callable[[bytes], bytes]) -> None:
        assert isinstance(backend, FsspecBackend)
        p = Path(backend.entry_path(backend._skey(key)))
        p.write_bytes(mutate(p.read_bytes()))


class TestMemoryProtocol(BackendTests):
    """fsspec's in-process memory filesystem, reachable only with backend="fsspec"."""

    @pytest.fixture
    def backend_factory(self) -> Iterator[Callable[..., Backend[Any]]]:
        url = f"memory://ectransfer-test-{uuid.uuid4().hex}"
        yield lambda **opts: open_backend(url, backend="fsspec", **opts)
        import fsspec

        memfs = fsspec.filesystem("memory")
        if memfs.exists(url):
            memfs.rm(url, recursive=True)

    def corrupt(self, backend: Backend[Any], key: str, mutate: Callable[[bytes], bytes]) -> None:
        assert isinstance(backend, FsspecBackend)
        path = backend.entry_path(backend._skey(key))
        backend.filesystem.pipe_file(path, mutate(backend.filesystem.cat_file(path)))


# ------------------------------------------------------------------------- layout shared with fs
def test_file_protocol_and_fs_backend_share_entries(tmp_path: Path) -> None:
    long_key = "k" * 256  # longer than a file name may be: shortened the same way by both
    with open_backend(str(tmp_path), namespace="model-a") as fs_be, \
            open_backend(f"file://{tmp_path}", backend="fsspec", namespace="model-a") as ff_be:
        assert isinstance(fs_be, FsBackend) and isinstance(ff_be, FsspecBackend)
        for key, seed in (("img-1", 1), (long_key, 2)):
            a, b = make_tensor((9, 16), torch.bfloat16, seed=seed), make_tensor((4, 4), torch.float16, seed=seed)
            fs_be.put(key, a)
            assert same_bits(ff_be.get(key), a)
            ff_be.put(key, b)
            assert same_bits(fs_be.get(key), b)
            assert str(fs_be.entry_path(fs_be._skey(key))) == ff_be.entry_path(ff_be._skey(key))
        ff_be.delete(["img-1"])
        assert fs_be.exists(["img-1", long_key]) == [False, True]


def test_s3_entry_is_plain_safetensors_in_the_fs_layout(moto: SpawnedServer, raw: Any) -> None:
    from safetensors.torch import load

    url = _s3_url()
    t = make_tensor((5, 7, 3), torch.bfloat16, seed=4)
    with open_backend(url, namespace="m", **moto.options) as be:
        be.put("mmhash-1", t)
    blob = raw.cat_file(f"{url.removeprefix('s3://')}/m/mmhash-1/{ENTRY_FILE}")
    loaded = load(blob)
    assert list(loaded) == ["ec_cache"] and same_bits(loaded["ec_cache"], t)


def test_rename_writes_leave_only_the_entry(tmp_path: Path) -> None:
    with open_backend(f"file://{tmp_path}", backend="fsspec") as be:
        for i in range(3):
            be.put("k", torch.full((64,), i))
        be.put_many({f"b{i}": torch.ones(3) for i in range(4)})
    names = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert names == [ENTRY_FILE] * 5, names


# ------------------------------------------------------------------------- multipart
def test_multipart_above_threshold_single_put_below(moto: SpawnedServer, raw: Any) -> None:
    url = _s3_url()
    big = make_tensor((11 << 20,), torch.uint8, seed=1)  # 11 MiB: three 5 MiB parts
    small = make_tensor((9 << 20,), torch.uint8, seed=2)  # under the 10 MiB threshold
    with open_backend(url, multipart_threshold="10MiB", part_size="5MiB", **moto.options) as be:
        be.put_many({"big": big, "small": small})
        assert same_bits(be.get("big"), big) and same_bits(be.get("small"), small)
        etag_big = raw.info(be.entry_path("big"))["ETag"]
        etag_small = raw.info(be.entry_path("small"))["ETag"]
    assert etag_big.strip('"').endswith("-3"), f"not a 3-part upload: ETag {etag_big}"
    assert "-" not in etag_small, f"a single PUT was expected: ETag {etag_small}"


def test_reader_never_sees_a_partial_multipart_upload(moto: SpawnedServer) -> None:
    url = _s3_url()
    opts = {**moto.options, "multipart_threshold": "10MiB", "part_size": "5MiB"}
    with open_backend(url, **opts) as writer, open_backend(url, **opts) as reader:
        errors: list[BaseException] = []
        seen: set[int] = set()
        done = threading.Event()

        def write() -> None:
            try:
                for v in (1, 2, 3):
                    writer.put("video", torch.full((11 << 20,), v, dtype=torch.uint8))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            finally:
                done.set()

        th = threading.Thread(target=write)
        th.start()
        while not done.is_set():
            try:
                vals = torch.unique(reader.get("video"))
            except EntryNotFoundError:
                continue  # before the first upload completed: absent, never partial
            assert vals.numel() == 1, f"mixed entry: {vals.tolist()}"
            seen.add(int(vals[0]))
        th.join(60)
        assert not errors, errors[0]
        assert int(torch.unique(reader.get("video"))[0]) == 3


# ------------------------------------------------------------------------- replaced behind our back
@pytest.mark.parametrize("replacement", ["other_namespace", "foreign_file", "other_tensor_name", "truncated"])
def test_object_replaced_behind_the_backend(moto: SpawnedServer, raw: Any, replacement: str) -> None:
    from safetensors.torch import save

    url = _s3_url()
    t = make_tensor((32, 8), torch.bfloat16, seed=3)
    with open_backend(url, namespace="mine", accept_foreign=False, **moto.options) as be:
        be.put("k", t)
        path = be.entry_path(be._skey("k"))
        blob = {
            "other_namespace": lambda: encode(t, "theirs").to_bytes(),
            "foreign_file": lambda: save({"ec_cache": t}),
            "other_tensor_name": lambda: save({"weights": t}),
            "truncated": lambda: raw.cat_file(path)[:-1],
        }[replacement]()
        raw.pipe_file(path, blob)
        with pytest.raises(CorruptEntryError):
            be.get("k")
        with pytest.raises(CorruptEntryError):
            be.get_many(["k"])
        with pytest.raises(CorruptEntryError):
            be.get_into("k", torch.empty_like(t))


# ------------------------------------------------------------------------- clean-up
def _clear_case(be_factory: Callable[..., Backend[Any]], root: str, write_other: Callable[[str, bytes], None],
                listing: Callable[[], list[str]]) -> None:
    plain, ns_a, ns_b = be_factory(), be_factory(namespace="a"), be_factory(namespace="b")
    for be in (plain, ns_a, ns_b):
        be.put_many({"x": torch.ones(2), "y": torch.ones(2)})
    others = [f"{root}/README.txt", f"{root}/x/notes.bin", f"{root}/a/b/c/{ENTRY_FILE}", f"{root}/{ENTRY_FILE}"]
    for path in others:
        write_other(path, b"not ours")
    assert isinstance(ns_a, FsspecBackend) and isinstance(plain, FsspecBackend)
    assert ns_a.clear() == 2
    assert ns_a.exists(["x", "y"]) == [False, False] and ns_b.exists(["x"]) == [True]
    assert plain.exists(["x", "y"]) == [True, True]
    assert plain.clear() == 2
    assert plain.exists(["x"]) == [False] and ns_b.exists(["x", "y"]) == [True, True]
    ns_b.put("z", torch.ones(1))
    assert plain.clear(all_namespaces=True) == 3
    assert ns_b.exists(["x", "y", "z"]) == [False] * 3
    remaining = sorted(listing())
    assert remaining == sorted(others), remaining
    for be in (plain, ns_a, ns_b):
        be.close()


def test_clear_deletes_only_entries_s3(moto: SpawnedServer, raw: Any) -> None:
    url = _s3_url()
    root = url.removeprefix("s3://")
    _clear_case(lambda **o: open_backend(url, **{**moto.options, **o}), root, raw.pipe_file,
                lambda: raw.find(root))


def test_clear_deletes_only_entries_file(tmp_path: Path) -> None:
    def write_other(path: str, data: bytes) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)

    _clear_case(lambda **o: open_backend(f"file://{tmp_path}", backend="fsspec", **o), str(tmp_path),
                write_other, lambda: [str(p) for p in tmp_path.rglob("*") if p.is_file()])


def test_clear_removes_stray_temp_files(tmp_path: Path) -> None:
    with open_backend(f"file://{tmp_path}", backend="fsspec") as be:
        be.put("k", torch.ones(2))
        stray = tmp_path / "k" / f"{TMP_PREFIX}999-crashed-writer"
        stray.write_bytes(b"half an entry")
        assert isinstance(be, FsspecBackend)
        assert be.clear() == 1
        assert not stray.exists() and not (tmp_path / "k").exists()


# ------------------------------------------------------------------------- configuration
def test_url_forms_and_options(moto: SpawnedServer) -> None:
    endpoint = moto.options["endpoint_url"]
    creds = {"key": moto.options["key"], "secret": moto.options["secret"]}
    with open_backend(f"s3a://{BUCKET}/p?endpoint_url={endpoint}&part_size=6MiB&multipart_threshold=12MiB",
                      **creds) as be:
        assert isinstance(be, FsspecBackend)
        assert be.config.protocol == "s3" and be.config.root == f"{BUCKET}/p"
        assert be.config.part_size == 6 << 20 and be.config.endpoint_url == endpoint
        be.put("k", torch.arange(5))
        assert torch.equal(be.get("k"), torch.arange(5))
    with open_backend(backend="fsspec", protocol="s3", root=f"{BUCKET}/p", endpoint_url=endpoint, **creds) as be:
        assert torch.equal(be.get("k"), torch.arange(5))


def test_memory_url_is_ours_unless_fsspec_is_asked_for() -> None:
    from ectransfer.backends.memory import MemoryBackend

    with open_backend("memory://x") as be:
        assert isinstance(be, MemoryBackend)
    with open_backend("memory://x", backend="fsspec") as be:
        assert isinstance(be, FsspecBackend) and be.config.protocol == "memory"


@pytest.mark.parametrize("url, options, match", [
    ("s3:///prefix", {}, "bucket"),
    (f"s3://{BUCKET}/p", {"part_size": "1MiB"}, "part_size"),
    (f"s3://{BUCKET}/p", {"multipart_threshold": "8MiB", "part_size": "8MiB"}, "multipart_threshold"),
    (f"s3://{BUCKET}/p", {"max_concurrency": 0}, "max_concurrency"),
    (f"s3://{BUCKET}/p", {"retries": -1}, "retries"),
    (f"s3://{BUCKET}/p", {"colour": "red"}, "colour"),
    (f"s3://{BUCKET}/p", {"storage_options": "key=1"}, "storage_options"),
    ("file:///tmp/x", {"backend": "fsspec", "endpoint_url": "http://h"}, "endpoint_url"),
    ("file://server/share", {"backend": "fsspec"}, "host"),
    ("nosuchproto://b/p", {"backend": "fsspec"}, "nosuchproto"),
])
def test_bad_configuration_names_the_option(url: str, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        open_backend(url, **options)
