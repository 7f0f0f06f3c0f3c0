"""The conformance test class, :class:`BackendTests` (needs pytest; see :mod:`ectransfer.testing`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from ectransfer.backend import Backend, Capabilities
from ectransfer.errors import (
    BackendClosedError,
    CorruptEntryError,
    EntryNotFoundError,
    IncompatibleTensorError,
    InvalidKeyError,
)
from ectransfer.testing import DTYPES, INVALID_KEYS, MUTATIONS, SHAPES, make_tensor, same_bits

__all__ = ["BackendTests"]


class BackendTests:
    """Conformance tests every backend must pass. See the module docstring."""

    # ----------------------------------------------------------------- fixtures
    @pytest.fixture
    def backend_factory(self) -> Callable[..., Backend[Any]]:
        raise NotImplementedError("subclasses define a backend_factory fixture")

    @pytest.fixture
    def open_backend(self, backend_factory: Callable[..., Backend[Any]]) -> Iterator[Callable[..., Backend[Any]]]:
        opened: list[Backend[Any]] = []

        def _open(**options: Any) -> Backend[Any]:
            b = backend_factory(**options)
            opened.append(b)
            return b

        yield _open
        for b in opened:
            b.close()

    @pytest.fixture
    def backend(self, open_backend: Callable[..., Backend[Any]]) -> Backend[Any]:
        return open_backend()

    @pytest.fixture
    def reader(self, backend: Backend[Any]) -> Backend[Any]:
        return backend

    def corrupt(self, backend: Backend[Any], key: str, mutate: Callable[[bytes], bytes]) -> None:
        """Replace the stored bytes of ``key`` with ``mutate(stored bytes)``."""
        pytest.skip(f"{type(self).__name__} does not implement corrupt(); corruption tests need it")

    # ----------------------------------------------------------------- round trips
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    def test_roundtrip(self, backend: Backend[Any], reader: Backend[Any], dtype: torch.dtype,
                       shape: tuple[int, ...]) -> None:
        t = make_tensor(shape, dtype, seed=len(shape))
        backend.put("k1", t)
        got = reader.get("k1")
        assert same_bits(got, t), f"{dtype}{shape} did not round-trip bit-exactly"
        assert got.device.type == "cpu"

    @pytest.mark.parametrize("view", ["transposed", "strided", "sliced"])
    def test_roundtrip_non_contiguous(self, backend: Backend[Any], reader: Backend[Any], view: str) -> None:
        base = make_tensor((12, 10), torch.bfloat16, seed=3)
        t = {"transposed": base.t(), "strided": base[::2, ::3], "sliced": base[2:9, 1:4]}[view]
        assert not t.is_contiguous()
        backend.put("nc", t)
        assert same_bits(reader.get("nc"), t.contiguous())

    def test_large_item(self, backend: Backend[Any], reader: Backend[Any]) -> None:
        t = make_tensor((1296, 3584 // 4), torch.bfloat16, seed=9)  # ~2.3 MB; see backend tests for more
        backend.put("big", t)
        assert same_bits(reader.get("big"), t)

    def test_get_into(self, backend: Backend[Any], reader: Backend[Any]) -> None:
        t = make_tensor((33, 17), torch.float16, seed=4)
        backend.put("into", t)
        out = torch.full((33, 17), 7, dtype=torch.float16)
        assert reader.get_into("into", out) is out
        assert same_bits(out, t)

    @pytest.mark.parametrize("wrong", ["dtype", "shape", "non_contiguous"])
    def test_get_into_incompatible(self, backend: Backend[Any], reader: Backend[Any], wrong: str) -> None:
        backend.put("into", make_tensor((8, 6), torch.bfloat16))
        out = {
            "dtype": torch.empty((8, 6), dtype=torch.float16),
            "shape": torch.empty((6, 8), dtype=torch.bfloat16),
            "non_contiguous": torch.empty((6, 8), dtype=torch.bfloat16).t(),
        }[wrong]
        with pytest.raises(IncompatibleTensorError):
            reader.get_into("into", out)

    def test_get_device_cpu(self, backend: Backend[Any], reader: Backend[Any]) -> None:
        t = make_tensor((4, 4), torch.float32)
        backend.put("dev", t)
        assert same_bits(reader.get("dev", device="cpu"), t)

    def test_overwrite_replaces(self, backend: Backend[Any], reader: Backend[Any]) -> None:
        a = make_tensor((10, 10), torch.bfloat16, seed=1)
        b = make_tensor((3, 7, 2), torch.float32, seed=2)
        backend.put("ow", a)
        assert same_bits(reader.get("ow"), a)
        backend.put("ow", b)
        assert same_bits(reader.get("ow"), b), "a second put must replace the entry"

    def test_returned_tensor_is_independent(self, backend: Backend[Any], reader: Backend[Any]) -> None:
        t = make_tensor((16, 16), torch.int8, seed=5)
        keep = t.clone()
        backend.put("indep", t)
        t.fill_(0)  # the caller reuses its buffer after put
        got = reader.get("indep")
        assert same_bits(got, keep)
        got.fill_(1)  # the caller mutates what it got
        assert same_bits(reader.get("indep"), keep)

    # ----------------------------------------------------------------- exists / delete / missing
    def test_exists_and_delete(self, backend: Backend[Any], reader: Backend[Any]) -> None:
        backend.put("e1", make_tensor((2, 2), torch.float32))
        backend.put("e2", make_tensor((2, 2), torch.float32))
        assert reader.exists(["e1", "nope", "e2"]) == [True, False, True]
        assert reader.exists([]) == []
        backend.delete(["e1", "never-written"])
        assert reader.exists(["e1", "e2"]) == [False, True]
        with pytest.raises(EntryNotFoundError):
            reader.get("e1")

    def test_release(self, backend: Backend[Any], reader: Backend[Any]) -> None:
        t = make_tensor((6, 6), torch.bfloat16, seed=12)
        backend.put("rel", t)
        assert same_bits(reader.get("rel"), t)
        reader.release(["rel", "never-written"])  # absent keys are not an error
        if type(reader).capabilities.peer_to_peer:
            assert reader.exists(["rel"]) == [False], "a released peer-to-peer entry must be freed"
        else:
            assert same_bits(reader.get("rel"), t), "a store must keep an entry after release"
        with pytest.raises(InvalidKeyError):
            reader.release(["bad/key"])

    def test_missing_key(self, reader: Backend[Any]) -> None:
        with pytest.raises(EntryNotFoundError):
            reader.get("absent")
        with pytest.raises(KeyError):  # also a KeyError for callers that know nothing of us
            reader.get("absent")
        with pytest.raises(EntryNotFoundError):
            reader.get_into("absent", torch.empty(3))

    @pytest.mark.parametrize("key", INVALID_KEYS, ids=lambda k: repr(k)[:20])
    def test_invalid_keys(self, backend: Backend[Any], key: Any) -> None:
        t = torch.zeros(2)
        for call in (lambda: backend.put(key, t), lambda: backend.get(key), lambda: backend.get_into(key, t),
                     lambda: backend.exists([key]), lambda: backend.delete([key]),
                     lambda: backend.put_many({key: t})):
            with pytest.raises(InvalidKeyError):
                call()
        with pytest.raises(InvalidKeyError):
            backend.exists("single-string-not-a-list")

    def test_key_charset_boundaries(self, backend: Backend[Any], reader: Backend[Any]) -> None:
        for key in ("a", "A.b_c-d:e", "0" * 256, "sha256:" + "f" * 64, "...", ".hidden"):
            backend.put(key, torch.tensor([1.0]))
            assert reader.exists([key]) == [True], key

    # ----------------------------------------------------------------- batches
    def test_batches(self, backend: Backend[Any], reader: Backend[Any]) -> None:
        items = {f"b{i}": make_tensor((i + 1, 5), torch.bfloat16, seed=i) for i in range(6)}
        backend.put_many(items)
        keys = list(items)
        assert reader.exists(keys) == [True] * 6
        for k, got in zip(keys, reader.get_many(keys)):
            assert same_bits(got, items[k])
        outs = [torch.empty_like(items[k]) for k in keys]
        reader.get_many_into(keys, outs)
        for k, o in zip(keys, outs):
            assert same_bits(o, items[k])
        with pytest.raises(EntryNotFoundError):
            reader.get_many(["b0", "absent"])
        with pytest.raises(ValueError):
            reader.get_many_into(keys, outs[:-1])

    # ----------------------------------------------------------------- corruption
    @pytest.mark.parametrize("mutation", sorted(MUTATIONS))
    def test_corrupt_entry_detected(self, backend: Backend[Any], reader: Backend[Any], mutation: str) -> None:
        t = make_tensor((8, 12), torch.bfloat16, seed=11)
        backend.put("bad", t)
        self.corrupt(backend, "bad", MUTATIONS[mutation])
        with pytest.raises(CorruptEntryError):
            reader.get("bad")
        out = torch.empty_like(t)
        with pytest.raises(CorruptEntryError):
            reader.get_into("bad", out)

    # ----------------------------------------------------------------- namespaces
    def test_namespaces_isolate(self, open_backend: Callable[..., Backend[Any]]) -> None:
        m1 = open_backend(namespace="model-a.bf16")
        m2 = open_backend(namespace="model-b.bf16")
        plain = open_backend()
        m1.put("img", make_tensor((3, 3), torch.bfloat16, seed=1))
        assert m2.exists(["img"]) == [False]
        assert plain.exists(["img"]) == [False]
        with pytest.raises(EntryNotFoundError):
            m2.get("img")
        m2.put("img", make_tensor((3, 3), torch.bfloat16, seed=2))
        assert same_bits(m1.get("img"), make_tensor((3, 3), torch.bfloat16, seed=1))
        assert same_bits(m2.get("img"), make_tensor((3, 3), torch.bfloat16, seed=2))
        with pytest.raises(InvalidKeyError):
            open_backend(namespace="bad/namespace")

    # ----------------------------------------------------------------- concurrency
    def test_concurrent_distinct_keys(self, backend: Backend[Any], reader: Backend[Any]) -> None:
        errors: list[BaseException] = []

        def worker(w: int) -> None:
            try:
                for i in range(10):
                    t = make_tensor((32, 32), torch.bfloat16, seed=w * 100 + i)
                    backend.put(f"w{w}-{i}", t)
                    assert same_bits(reader.get(f"w{w}-{i}"), t)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        assert not errors, errors[0]

    def test_concurrent_same_key_never_torn(self, backend: Backend[Any], reader: Backend[Any]) -> None:
        shape = (64, 256)
        backend.put("hot", torch.full(shape, 0, dtype=torch.int16))
        errors: list[BaseException] = []
        seen: set[int] = set()
        stop = threading.Event()

        def writer(v: int) -> None:
            try:
                for _ in range(15):
                    backend.put("hot", torch.full(shape, v, dtype=torch.int16))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        def read_loop() -> None:
            try:
                while not stop.is_set():
                    got = reader.get("hot")
                    vals = torch.unique(got)
                    assert vals.numel() == 1, f"torn read: values {vals.tolist()[:8]}"
                    seen.add(int(vals[0]))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        writers = [threading.Thread(target=writer, args=(v,)) for v in (1, 2, 3, 4)]
        readers = [threading.Thread(target=read_loop) for _ in range(3)]
        for th in readers + writers:
            th.start()
        for th in writers:
            th.join(timeout=120)
        stop.set()
        for th in readers:
            th.join(timeout=120)
        assert not errors, errors[0]
        assert int(torch.unique(reader.get("hot"))[0]) in (1, 2, 3, 4)
        assert seen, "readers never completed a read"

    # ----------------------------------------------------------------- lifecycle
    def test_close_then_use_fails(self, backend_factory: Callable[..., Backend[Any]]) -> None:
        b = backend_factory()
        with b as entered:
            assert entered is b
            entered.put("c", torch.ones(2))
        assert b.closed
        b.close()  # idempotent
        calls: list[Callable[[], object]] = [
            lambda: b.put("c", torch.ones(2)), lambda: b.get("c"), lambda: b.exists(["c"]),
            lambda: b.delete(["c"]), lambda: b.get_into("c", torch.empty(2))]
        for call in calls:
            with pytest.raises(BackendClosedError):
                call()

    def test_capabilities_declared(self, backend: Backend[Any]) -> None:
        caps = type(backend).capabilities
        assert isinstance(caps, Capabilities)
        with pytest.raises(AttributeError):
            caps.persistent = not caps.persistent  # type: ignore[misc]
        ok, why = type(backend).is_available()
        assert ok is True and isinstance(why, str)
        assert type(backend).name and type(backend).name in repr(backend) or type(backend).__name__ in repr(backend)

    def test_persistent_capability_is_honest(self, backend_factory: Callable[..., Backend[Any]],
                                             open_backend: Callable[..., Backend[Any]]) -> None:
        first = backend_factory()
        t = make_tensor((5, 5), torch.float32, seed=8)
        first.put("persist", t)
        persistent = type(first).capabilities.persistent
        first.close()
        second = open_backend()
        if not persistent:
            pytest.skip("backend declares persistent=False: nothing must survive, nothing to check here")
        assert same_bits(second.get("persist"), t), "declared persistent, but a reopened backend lost the entry"
