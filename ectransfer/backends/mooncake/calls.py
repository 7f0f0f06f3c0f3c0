"""Run blocking Mooncake calls on worker threads so every call is bounded by a deadline.

Mooncake's data calls block in native code (releasing the GIL) with deadlines of their own
that can be longer than ``timeout_s``: a client whose master died retries for about 4 s per
call; master RPCs wait ``MC_RPC_TIMEOUT_MS`` (30 s by default). :class:`CallRunner` runs each
call on one of a few daemon threads; the caller waits until its deadline and then gets
:class:`~ectransfer.errors.TransferTimeoutError`. (``setup()`` and ``close()`` hold the GIL
while they run, so no thread can bound them: the backend sizes Mooncake's own deadlines for
``setup()`` instead.)

A call cannot be cancelled once it runs in native code: an **abandoned** call goes on until
Mooncake itself returns. Its ``on_abandoned_done`` callback then runs with the result (None if it
raised; the backend frees the staging slot there, or closes a client whose late ``setup()`` succeeded). A
call abandoned while still queued is never started. The threads are daemons, so an abandoned
call never delays interpreter exit.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ectransfer.errors import TransferTimeoutError

__all__ = ["CallRunner"]

T = TypeVar("T")


class _Job:
    __slots__ = ("abandoned", "done", "error", "fn", "lock", "on_abandoned_done", "result", "started")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.started = False
        self.abandoned = False
        self.on_abandoned_done: Callable[[Any], None] | None = None
        self.result: Any = None
        self.error: BaseException | None = None


class CallRunner:
    """``threads`` daemon workers; :meth:`run` is thread-safe."""

    def __init__(self, threads: int, name: str = "mooncake") -> None:
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-io-{i}", daemon=True) for i in range(threads)]
        self._busy = 0
        self._idle = threading.Condition()
        self._when_idle: list[Callable[[], None]] = []
        for t in self._threads:
            t.start()

    def run(self, fn: Callable[[], T], timeout_s: float, what: str,
            on_abandoned_done: Callable[[T], None] | None = None) -> T:
        """``fn()`` on a worker; :class:`TransferTimeoutError` naming ``what`` after ``timeout_s``."""
        job = _Job(fn)
        with self._idle:
            self._busy += 1
        self._queue.put(job)
        if not job.done.wait(max(0.0, timeout_s)):
            with job.lock:
                if not job.done.is_set():
                    job.abandoned = True
                    job.on_abandoned_done = on_abandoned_done
                    state = "is still running" if job.started else "never started (all workers busy)"
                    raise TransferTimeoutError(
                        f"mooncake backend: {what} did not finish within {timeout_s:.1f} s (timeout_s); the call {state}"
                    )
        if job.error is not None:
            raise job.error
        result: T = job.result
        return result

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with job.lock:
                skip = job.abandoned
                job.started = True
            if not skip:
                try:
                    job.result = job.fn()
                except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                    job.error = exc
            with job.lock:
                job.done.set()
                callback = job.on_abandoned_done if job.abandoned else None
            if callback is not None:
                callback(job.result)  # None if the call failed or never started
            self._finished()

    def _finished(self) -> None:
        with self._idle:
            self._busy -= 1
            ready = self._when_idle if self._busy == 0 else []
            if ready:
                self._when_idle = []
        for fn in ready:
            fn()

    def shutdown(self, fn: Callable[[], None], timeout_s: float, what: str) -> bool:
        """Run ``fn`` (closing what the calls use) once no call is in flight, then stop.

        True: nothing was in flight and ``fn`` ran now (bounded by ``timeout_s``). False:
        abandoned calls still run; ``fn`` runs on the worker that finishes the last of them.
        """
        with self._idle:
            deferred = self._busy > 0
            if deferred:
                self._when_idle.append(lambda: self._final(fn))
        if deferred:
            return False
        try:
            self.run(fn, timeout_s, what)
        finally:
            self.stop()
        return True

    def _final(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - nobody waits for a deferred close any more
            pass
        finally:
            self.stop()

    def stop(self) -> None:
        """Let the workers exit once the queue is drained (abandoned calls finish first)."""
        for _ in self._threads:
            self._queue.put(None)
