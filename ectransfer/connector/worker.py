"""The worker side of the lifecycle: saves off the engine step, fetches before it, loads in it.

* **save** (producer, tensor-parallel rank 0 only): hand the encoder output to an
  :class:`~ectransfer.connector.saver.AsyncSaver` and return; a device tensor is copied to a
  reused pinned buffer on a side stream. The outcome is reported at the next step.
* **fetch** (consumer, every rank): on a request from the scheduler over the control channel,
  read the item into staging on a thread pool, verified by the backend (checksum) and against
  the expected number of embeddings, and answer ``ready`` or ``failed``. Staging is bounded by
  ``max_staged_bytes``; a fetch that does not fit fails (its request re-encodes) rather than
  waiting for memory that only a later step could free.
* **load** (consumer, inside the step): move the items the step's plan names from staging into
  the engine's encoder cache. Nothing is read from the backend here, so a step never waits on
  the network; for a CUDA device the host-to-device copy runs on a side stream that the
  engine's stream waits for.

Nothing here raises into the engine for a failed transfer: failures become events, report
entries and counters.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ectransfer.backend import Backend
from ectransfer.connector.options import ConnectorOptions
from ectransfer.connector.plan import ItemRef, StepPlan, WorkerReport
from ectransfer.connector.saver import AsyncSaver
from ectransfer.connector.staging import StagingPool, host_view, to_device_async
from ectransfer.connector.stats import StatsRecorder
from ectransfer.errors import (
    CapacityError,
    CorruptEntryError,
    ECTransferError,
    EntryNotFoundError,
    IncompatibleTensorError,
    TransferTimeoutError,
)

__all__ = ["WorkerSide", "failure_kind"]

log = logging.getLogger(__name__)

Reply = Callable[[dict[str, Any]], None]


def failure_kind(exc: BaseException) -> str:
    """The short reason class a failed fetch reports (also a metric suffix)."""
    if isinstance(exc, EntryNotFoundError):
        return "missing"
    if isinstance(exc, CorruptEntryError):
        return "corrupt"
    if isinstance(exc, (TransferTimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, CapacityError):
        return "capacity"
    if isinstance(exc, IncompatibleTensorError):
        return "shape"
    return "error"


@dataclass
class _Staged:
    tensor: torch.Tensor
    nbytes: int
    buffer: torch.Tensor | None = None  # pool buffer behind ``tensor`` (device loads)


class WorkerSide:
    """One worker's saves, fetches and loads. Thread-safe; see the module docstring."""

    def __init__(self, backend: Backend[Any], options: ConnectorOptions, *, produce: bool, consume: bool,
                 device: torch.device | str = "cpu", release_after_load: bool = True,
                 host_staging: bool | None = None) -> None:
        """``host_staging`` (default: when ``device`` is CUDA) lands fetches in reused, bounded
        (pinned when CUDA is present) host buffers and copies them to ``device`` at load."""
        self.backend = backend
        self.options = options
        self.device = torch.device(device)
        self.produce = produce
        self.consume = consume
        self.release_after_load = release_after_load
        self.stats = StatsRecorder()
        self._lock = threading.Lock()
        self._saver = (AsyncSaver(backend, max_inflight_bytes=options.max_inflight_bytes,
                                  threads=options.save_threads, timeout_s=options.save_wait_s)
                       if produce else None)
        self._saved: dict[str, int] = {}
        self._save_failed: dict[str, str] = {}
        self._saving: dict[str, Future[None]] = {}
        self._fetch_pool = (ThreadPoolExecutor(options.load_threads, thread_name_prefix="ectransfer-fetch")
                            if consume else None)
        self._wanted: dict[str, int] = {}  # item id -> generation of the fetch that may stage it
        self._generation = 0
        self._staged: dict[str, _Staged] = {}
        self._staged_bytes = 0
        self._loaded: set[str] = set()
        # Host staging for device loads; pinned when CUDA is present. Bounded like staging.
        if host_staging is None:
            host_staging = self.device.type == "cuda"
        self._pool = StagingPool(options.max_staged_bytes) if host_staging else None
        self._in_copy: list[tuple[Any, torch.Tensor]] = []  # (event, pool buffer) until the copy ran
        self._layouts: dict[str, tuple[int, torch.dtype]] = {}  # modality -> (width, dtype) seen

    # ------------------------------------------------------------------ saves
    def save(self, item_id: str, key: str, tensor: torch.Tensor) -> None:
        """Start saving ``tensor``; returns as soon as the tensor is handed over (never raises)."""
        if self._saver is None:
            return
        t0 = time.perf_counter()
        try:
            future = self._saver.submit(key, tensor)
        except ECTransferError as exc:
            self._record_save(item_id, exc, tensor)
            return
        finally:
            self.stats.observe("save_blocked", (time.perf_counter() - t0) * 1e3)
        with self._lock:
            self._saving[item_id] = future
        start = time.perf_counter()
        future.add_done_callback(lambda f: self._save_done(item_id, f, tensor, start))

    def _save_done(self, item_id: str, future: Future[None], tensor: torch.Tensor, start: float) -> None:
        exc = future.exception()
        if exc is None:
            self.stats.observe("save", (time.perf_counter() - start) * 1e3)
        self._record_save(item_id, exc, tensor)

    def _record_save(self, item_id: str, exc: BaseException | None, tensor: torch.Tensor) -> None:
        with self._lock:
            self._saving.pop(item_id, None)
            if exc is None:
                self._saved[item_id] = 1
                self.stats.add("saves")
                self.stats.add("save_bytes", tensor.numel() * tensor.element_size())
            else:
                self._save_failed[item_id] = f"{type(exc).__name__}: {exc}"
                self.stats.add("save_failures")
                log.warning("ectransfer: saving item %s failed: %s", item_id, exc)

    # ------------------------------------------------------------------ fetches
    def handle(self, msg: dict[str, Any], reply: Reply) -> None:
        """Control-channel handler (see :mod:`ectransfer.connector.channel`)."""
        op = msg.get("op")
        if op == "fetch":
            items, announced, seqs = msg["items"], msg.get("announced") or [], msg.get("seqs") or []
            for i, raw in enumerate(items):
                ref = ItemRef.from_wire(raw)
                seq = seqs[i] if i < len(seqs) else 0

                def reply_seq(event: dict[str, Any], seq: Any = seq) -> None:
                    reply({**event, "seq": seq})

                self.fetch(ref, reply_seq, wait_s=float(msg.get("wait_s", 0.0)),
                           announced=bool(announced[i]) if i < len(announced) else False)
        elif op == "drop":
            self.drop(msg["ids"])
        else:
            log.warning("ectransfer control channel: unknown op %r", op)

    def fetch(self, ref: ItemRef, reply: Reply, *, wait_s: float, announced: bool) -> None:
        """Stage ``ref`` in the background; ``reply`` gets ``ready`` or ``failed``.

        An ``announced`` item (its producer said it saved it) may not be visible yet: it is
        retried until ``wait_s`` has passed.
        """
        if self._fetch_pool is None:
            reply({"ev": "failed", "id": ref.item_id, "kind": "error", "reason": "this worker does not consume"})
            return
        with self._lock:
            if ref.item_id in self._staged:
                reply({"ev": "ready", "id": ref.item_id, "nbytes": self._staged[ref.item_id].nbytes})
                return
            self._generation += 1
            gen = self._wanted[ref.item_id] = self._generation
        self._fetch_pool.submit(self._fetch, ref, gen, reply, time.monotonic() + wait_s, announced)

    def _fetch(self, ref: ItemRef, gen: int, reply: Reply, deadline: float, announced: bool) -> None:
        t0 = time.perf_counter()
        delay = 0.01
        while True:
            try:
                staged = self._land(ref)
                break
            except EntryNotFoundError as exc:
                if announced and time.monotonic() + delay < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.2)
                    continue
                self._fetch_failed(ref, gen, exc, reply)
                return
            except Exception as exc:  # noqa: BLE001 - every failure is reported, none escapes
                self._fetch_failed(ref, gen, exc, reply)
                return
        with self._lock:
            current = self._wanted.get(ref.item_id) == gen
            fits = self._staged_bytes + staged.nbytes <= self.options.max_staged_bytes
            if current:
                del self._wanted[ref.item_id]
                if fits:
                    self._staged[ref.item_id] = staged
                    self._staged_bytes += staged.nbytes
        if not current:  # dropped (or fetched again) while this fetch ran
            self._free(staged)
            return
        if not fits:
            self._free(staged)
            self._fetch_failed(ref, gen, CapacityError(
                f"staging holds {self._staged_bytes} bytes; item {ref.item_id} ({staged.nbytes} bytes) "
                f"exceeds max_staged_bytes={self.options.max_staged_bytes}"), reply)
            return
        if self.release_after_load:
            try:
                self.backend.release([ref.key])
            except ECTransferError as exc:  # the writer's lease frees it anyway
                log.info("ectransfer: release of %s failed: %s", ref.key, exc)
        self.stats.add("fetches")
        self.stats.add("fetch_bytes", staged.nbytes)
        self.stats.observe("fetch", (time.perf_counter() - t0) * 1e3)
        reply({"ev": "ready", "id": ref.item_id, "nbytes": staged.nbytes})

    def _fetch_failed(self, ref: ItemRef, gen: int, exc: BaseException, reply: Reply) -> None:
        kind = failure_kind(exc)
        with self._lock:
            if self._wanted.get(ref.item_id) == gen:
                del self._wanted[ref.item_id]
        self.stats.add(f"fetch_{kind}")
        log.warning("ectransfer: fetching item %s (%s) failed: %s: %s", ref.item_id, ref.key, type(exc).__name__, exc)
        reply({"ev": "failed", "id": ref.item_id, "kind": kind, "reason": f"{type(exc).__name__}: {exc}"})

    def _land(self, ref: ItemRef) -> _Staged:
        """Read and verify one item into staging (pinned host memory for a device load)."""
        layout = self._layouts.get(ref.modality)
        if self._pool is not None and layout is not None and ref.num_embeds > 0:
            width, dtype = layout
            nbytes = ref.num_embeds * width * dtype.itemsize
            buf = self._pool.acquire(nbytes, self.options.load_timeout_s)
            try:
                host = host_view(buf, torch.Size((ref.num_embeds, width)), dtype)
                self.backend.get_into(ref.key, host)
                return _Staged(host, nbytes, buf)
            except IncompatibleTensorError:
                self._pool.release(buf)  # another layout than last time: take the general path
            except BaseException:
                self._pool.release(buf)
                raise
        tensor = self.backend.get(ref.key)
        self._check_shape(ref, tensor)
        if tensor.dim() == 2:
            self._layouts[ref.modality] = (int(tensor.shape[1]), tensor.dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if self._pool is None:
            return _Staged(tensor, nbytes)
        buf = self._pool.acquire(nbytes, self.options.load_timeout_s)
        host = host_view(buf, tensor.shape, tensor.dtype)
        host.copy_(tensor)
        return _Staged(host, nbytes, buf)

    def _check_shape(self, ref: ItemRef, tensor: torch.Tensor) -> None:
        if self.options.verify_shape and ref.num_embeds > 0 and (tensor.dim() == 0 or tensor.shape[0] != ref.num_embeds):
            raise IncompatibleTensorError(
                f"item {ref.item_id} holds {list(tensor.shape)}, the request expects {ref.num_embeds} embeddings")

    def drop(self, item_ids: list[str]) -> None:
        """Forget staged (or still fetching) items nobody will load."""
        freed = []
        with self._lock:
            for item_id in item_ids:
                self._wanted.pop(item_id, None)
                staged = self._staged.pop(item_id, None)
                if staged is not None:
                    self._staged_bytes -= staged.nbytes
                    freed.append(staged)
        for staged in freed:
            self._free(staged)

    def _free(self, staged: _Staged) -> None:
        if staged.buffer is not None and self._pool is not None:
            self._pool.release(staged.buffer)

    # ------------------------------------------------------------------ loads
    def load(self, plan: StepPlan, cache: MutableMapping[str, torch.Tensor]) -> None:
        """Move the plan's items from staging into ``cache`` (keyed by item id)."""
        self._reclaim_copied()
        for ref in plan.load:
            if ref.item_id in cache:
                continue
            with self._lock:
                staged = self._staged.pop(ref.item_id, None)
                if staged is not None:
                    self._staged_bytes -= staged.nbytes
            if staged is None:
                # The scheduler plans only items this worker reported ready and never drops a
                # planned one, so this means a bug or a restarted worker. Read it now rather
                # than leave the engine without the item it is about to gather.
                log.error("ectransfer: planned item %s was not staged; reading it synchronously", ref.item_id)
                self.stats.add("load_sync_fallbacks")
                staged = self._land(ref)
            cache[ref.item_id] = self._to_device(staged)
            self.stats.add("loads")
            self.stats.add("load_bytes", staged.nbytes)
            with self._lock:
                self._loaded.add(ref.item_id)

    def _to_device(self, staged: _Staged) -> torch.Tensor:
        if staged.buffer is None and self.device.type == "cpu":
            return staged.tensor  # a tensor of its own: the cache may keep it
        out = torch.empty(staged.tensor.shape, dtype=staged.tensor.dtype, device=self.device)
        event = to_device_async(staged.tensor, out)
        if staged.buffer is not None:
            with self._lock:
                self._in_copy.append((event, staged.buffer))
        return out

    def _reclaim_copied(self) -> None:
        """Return staging buffers whose host-to-device copy has finished to the pool."""
        if self._pool is None:
            return
        with self._lock:
            done = [(e, b) for e, b in self._in_copy if e is None or e.query()]
            self._in_copy = [(e, b) for e, b in self._in_copy if not (e is None or e.query())]
        for _, buf in done:
            self._pool.release(buf)

    # ------------------------------------------------------------------ reporting
    def finished(self) -> tuple[set[str], set[str]]:
        """Item ids saved / loaded since the last call."""
        with self._lock:
            saved, loaded = set(self._saved), self._loaded
            self._loaded = set()
        return saved, loaded

    def report(self) -> WorkerReport | None:
        """This step's report (saves done or failed, stats); None when there is nothing."""
        with self._lock:
            saved, self._saved = self._saved, {}
            failed, self._save_failed = self._save_failed, {}
            self.stats.set_gauge("staged_bytes", self._staged_bytes)
            self.stats.set_gauge("saves_in_flight", len(self._saving))
        if self._saver is not None:
            self.stats.set_gauge("save_inflight_bytes", self._saver.inflight_bytes)
        self._report_backend_stats()
        report = WorkerReport(saved, failed, self.stats.take())
        return None if report.is_empty() else report

    def _report_backend_stats(self) -> None:
        try:
            now = self.backend.stats()
        except Exception as exc:  # noqa: BLE001 - a backend's counters must never break a step
            log.debug("ectransfer: backend stats failed: %s", exc)
            return
        for name, value in now.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.stats.set_gauge(f"backend_{name}", value)

    @property
    def staged_bytes(self) -> int:
        return self._staged_bytes

    def close(self) -> None:
        """Finish in-flight saves (bounded by ``save_wait_s``), stop threads, close the backend."""
        try:
            if self._saver is not None:
                try:
                    self._saver.close(self.options.save_wait_s)
                except TransferTimeoutError as exc:
                    log.warning("ectransfer: shutting down with saves unfinished: %s", exc)
            if self._fetch_pool is not None:
                self._fetch_pool.shutdown(wait=True, cancel_futures=True)
            self.drop(list(self._staged))
        finally:
            self.backend.close()
