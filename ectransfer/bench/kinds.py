"""The kinds of thing the bench times on the same items: ectransfer itself and its raw baseline.

A :class:`Subject` saves an item under a key and loads it into a caller's preallocated
destination. ``save`` returns how long the caller was *blocked* when the save goes on in the
background (ectransfer, through :class:`~ectransfer.connector.saver.AsyncSaver`, as the
connector's worker side does), or None when the call blocks for the whole save (raw clients,
vLLM's example connector). ``load`` returns once the bytes are in the destination, on its
device. ``forget`` (untimed) tells the reader it is done and removes the entries.

vLLM's ``ECExampleConnector`` is the third kind, in :mod:`ectransfer.bench.vllm_example`.
"""

from __future__ import annotations

import abc
import time
from typing import Any

import torch

from ectransfer.backend import Backend
from ectransfer.bench.raw import RawClient
from ectransfer.codec import payload_view
from ectransfer.connector.saver import AsyncSaver
from ectransfer.connector.staging import StagingPool, host_view

__all__ = ["EctransferSubject", "RawSubject", "Subject"]

#: AsyncSaver's default in-flight bound, raised when ``concurrency`` items would not fit
_INFLIGHT_BYTES = 1 << 30


class Subject(abc.ABC):
    """One kind of transfer the bench times (see the module docstring)."""

    kind: str
    #: short tag in the keys this subject writes (``ectb-<run>-<tag>-<i>``)
    tag: str

    @abc.abstractmethod
    def save(self, key: str, item: torch.Tensor) -> float | None:
        """Store ``item`` under ``key``; seconds the caller was blocked, or None (all of it)."""

    @abc.abstractmethod
    def load(self, key: str, out: torch.Tensor) -> None:
        """Fill ``out`` with the item stored under ``key``."""

    @abc.abstractmethod
    def forget(self, keys: list[str]) -> None:
        """Release and remove the entries under ``keys`` (untimed cleanup)."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release what the subject holds."""


class EctransferSubject(Subject):
    """The backend through ectransfer: a writer saves via AsyncSaver, a reader loads.

    Writer and reader are two backend instances on the same URL (the realistic case: the
    encoder and the prefill instance each open their own); for a peer-to-peer backend the
    writer is the producer and the reader the consumer.
    """

    kind = "ectransfer"
    tag = "ec"

    def __init__(self, writer: Backend[Any], reader: Backend[Any], *, item_bytes: int, concurrency: int) -> None:
        self.writer = writer
        self.reader = reader
        self.timeout_s = writer.config.timeout_s
        self.saver = AsyncSaver(writer, max_inflight_bytes=max(_INFLIGHT_BYTES, concurrency * item_bytes),
                                threads=concurrency, timeout_s=self.timeout_s)

    def save(self, key: str, item: torch.Tensor) -> float:
        t0 = time.perf_counter()
        future = self.saver.submit(key, item)
        blocked = time.perf_counter() - t0
        future.result(timeout=self.timeout_s)
        return blocked

    def load(self, key: str, out: torch.Tensor) -> None:
        self.reader.get_into(key, out)

    def forget(self, keys: list[str]) -> None:
        self.reader.release(keys)
        self.writer.delete(keys)

    def close(self) -> None:
        self.saver.close()


class RawSubject(Subject):
    """The backend's raw client doing the same bytes (``--baseline``).

    With ``--device cuda`` the bytes cross through a reused pinned host buffer inside the timed
    part, as they must for any host-side client: the comparison with ectransfer stays fair.
    The client belongs to whoever built it (:class:`~ectransfer.bench.targets.Targets` closes it).
    """

    kind = "raw"
    tag = "raw"

    def __init__(self, client: RawClient, *, item_bytes: int, concurrency: int, device: str) -> None:
        self.client = client
        self.device = device
        self.item_bytes = item_bytes
        self.pool = StagingPool(max(1, concurrency) * max(item_bytes, 1) * 2) if device != "cpu" else None

    def save(self, key: str, item: torch.Tensor) -> None:
        if self.pool is None:
            self.client.write(key, payload_view(item))
            return None
        with self.pool.borrow(self.item_bytes) as buf:
            host = host_view(buf, item, item.dtype)
            host.copy_(item)  # synchronous device-to-host copy
            self.client.write(key, payload_view(host))
        return None

    def load(self, key: str, out: torch.Tensor) -> None:
        if self.pool is None:
            self.client.read_into(key, payload_view(out))
            return
        with self.pool.borrow(self.item_bytes) as buf:
            host = host_view(buf, out, out.dtype)
            self.client.read_into(key, payload_view(host))
            out.copy_(host)
            torch.cuda.synchronize(out.device)

    def forget(self, keys: list[str]) -> None:
        for k in keys:
            self.client.delete(k)
