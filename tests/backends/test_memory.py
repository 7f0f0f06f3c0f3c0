"""memory backend: conformance kit plus bounds and shared stores."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
import torch

from ectransfer import CapacityError, ConfigError, open_backend
from ectransfer.backend import Backend
from ectransfer.backends.memory import MemoryBackend
from ectransfer.testing import BackendTests


class TestMemory(BackendTests):
    @pytest.fixture
    def backend_factory(self) -> Callable[..., Backend[Any]]:
        name = f"test-{uuid.uuid4().hex}"
        return lambda **opts: open_backend(f"memory://{name}", **opts)

    def corrupt(self, backend: Backend[Any], key: str, mutate: Callable[[bytes], bytes]) -> None:
        assert isinstance(backend, MemoryBackend)
        skey = backend._skey(key)
        with backend._store.lock:
            backend._store.entries[skey] = mutate(backend._store.entries[skey])


def test_private_stores_are_separate() -> None:
    a, b = open_backend("memory://"), open_backend("memory://")
    a.put("k", torch.ones(2))
    assert b.exists(["k"]) == [False]


def test_lru_bound() -> None:
    be = open_backend("memory://", max_bytes="4KiB")
    t = torch.zeros(1000, dtype=torch.uint8)  # ~1.2 KB encoded
    for k in ("a", "b", "c"):
        be.put(k, t)
    be.get("a")
    be.put("d", t)
    assert be.exists(["a", "b", "c", "d"]) == [True, False, True, True]
    assert be.nbytes <= 4096 and be.evictions == 1
    with pytest.raises(CapacityError):
        be.put("huge", torch.zeros(8000, dtype=torch.uint8))


def test_shared_store_bound_conflict() -> None:
    name = uuid.uuid4().hex
    open_backend(f"memory://{name}", max_bytes=1000)
    with pytest.raises(ConfigError, match="max_bytes"):
        open_backend(f"memory://{name}", max_bytes=2000)
