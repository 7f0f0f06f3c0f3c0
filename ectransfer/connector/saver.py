"""Saves off the engine step: hand a tensor over, return at once, write in the background.

:meth:`AsyncSaver.submit` only records a CPU item (it keeps a reference: vLLM never mutates an
encoder output in place); a CUDA item is copied into a reused pinned staging buffer on a side
stream (the caller's stream is not blocked) and written once that copy completes. It returns a
:class:`concurrent.futures.Future`; worker threads call ``backend.put``. In-flight bytes are bounded: when the bound is reached, ``submit`` waits for
room up to ``timeout_s`` and then raises :class:`~ectransfer.errors.TransferTimeoutError`, so a
slow transport applies back-pressure instead of growing memory without limit.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ectransfer.backend import Backend
from ectransfer.connector.staging import StagedTensor, StagingPool, to_host_async
from ectransfer.errors import CapacityError, TransferTimeoutError

__all__ = ["AsyncSaver"]


class AsyncSaver:
    """Background ``put`` with bounded in-flight bytes."""

    def __init__(self, backend: Backend[Any], *, max_inflight_bytes: int = 1 << 30, threads: int = 2,
                 timeout_s: float = 30.0) -> None:
        if max_inflight_bytes <= 0 or threads <= 0 or timeout_s <= 0:
            raise ValueError("max_inflight_bytes, threads and timeout_s must be positive")
        self.backend = backend
        self.max_inflight_bytes = max_inflight_bytes
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ectransfer-save")
        self._cond = threading.Condition()
        self._inflight_bytes = 0
        self._inflight = 0
        # Staging for device tensors: bounded like the in-flight bytes (plus rounding room).
        self._staging = StagingPool(2 * max_inflight_bytes)

    @property
    def inflight_bytes(self) -> int:
        return self._inflight_bytes

    def submit(self, key: str, tensor: torch.Tensor) -> Future[None]:
        """Start saving ``tensor`` under ``key``; the future resolves when it is stored."""
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > self.max_inflight_bytes:
            raise CapacityError(f"item {key!r} ({nbytes} bytes) exceeds max_inflight_bytes={self.max_inflight_bytes}")
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while self._inflight_bytes + nbytes > self.max_inflight_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransferTimeoutError(
                        f"no room to save {key!r}: {self._inflight_bytes} bytes in flight for {self.timeout_s} s"
                    )
                self._cond.wait(left)
            self._inflight_bytes += nbytes
            self._inflight += 1
        try:
            if tensor.device.type == "cuda" and not self.backend.capabilities.zero_copy_device:
                staged = to_host_async(tensor, self._staging, self.timeout_s)
                return self._pool.submit(self._run_staged, key, staged, nbytes)
            return self._pool.submit(self._run, key, tensor, nbytes)
        except BaseException:
            self._release(nbytes)
            raise

    def _release(self, nbytes: int) -> None:
        with self._cond:
            self._inflight_bytes -= nbytes
            self._inflight -= 1
            self._cond.notify_all()

    def _run(self, key: str, tensor: torch.Tensor, nbytes: int) -> None:
        try:
            self.backend.put(key, tensor)
        finally:
            self._release(nbytes)

    def _run_staged(self, key: str, staged: StagedTensor, nbytes: int) -> None:
        try:
            self.backend.put(key, staged.wait())
        finally:
            staged.release()
            self._release(nbytes)

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until nothing is in flight (raise TransferTimeoutError after ``timeout_s``)."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        with self._cond:
            while self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransferTimeoutError(f"{self._inflight} saves still in flight after {limit} s")
                self._cond.wait(left)

    def close(self, timeout_s: float | None = None) -> None:
        """Flush, then stop the worker threads."""
        try:
            self.flush(timeout_s)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
