"""The timing loops: every subject saves and loads the same items, round by round.

For each round (see :class:`~ectransfer.bench.workload.Workload`) and each subject, in an
order rotated every round so no kind always runs first on a quiet or busy machine:

1. **save**: ``concurrency`` callers each save one item at a time (closed loop). An item's
   save latency runs from the call until the item is stored; for ectransfer that is
   ``AsyncSaver.submit`` plus waiting for its future, and the time inside ``submit`` is the
   *blocked* time.
2. **load**: the same callers load each item into its preallocated destination on the
   workload's device (synchronised there before the clock stops).
3. untimed: every destination is compared bit for bit with its source, then the reader
   releases the entries and the writer deletes them.

Each subject first saves and loads :data:`~ectransfer.bench.workload.WARMUP_ITEMS` items
untimed. A round trip is one item saved and then loaded: its latency is the item's save plus
load latency, its throughput the bytes over the save plus load wall time.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from ectransfer.bench.kinds import Subject
from ectransfer.bench.progress import Progress
from ectransfer.bench.workload import WARMUP_ITEMS, Workload, same_bits, scrub, stamp

__all__ = ["BenchError", "Job", "Measured", "run_jobs"]


class BenchError(Exception):
    """A transfer failed or returned wrong bytes during the run (exit code 1)."""


@dataclasses.dataclass
class Job:
    """One subject on one backend."""

    backend: str
    subject: Subject


@dataclasses.dataclass
class Measured:
    """Per-item timings (seconds) of one job, indexed by item, and the phases' wall time."""

    backend: str
    kind: str
    save_s: list[float]
    blocked_s: list[float | None]
    load_s: list[float]
    save_wall_s: float = 0.0
    load_wall_s: float = 0.0


class _Phase:
    """Run ``op(i)`` for every index with ``concurrency`` callers; time each call and the whole."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.pool = ThreadPoolExecutor(concurrency) if concurrency > 1 else None

    def run(self, op: Callable[[int], None], indices: list[int]) -> tuple[float, dict[int, float]]:
        times: dict[int, float] = {}
        pending = list(reversed(indices))
        lock = threading.Lock()

        def caller() -> None:
            while True:
                with lock:
                    if not pending:
                        return
                    i = pending.pop()
                t0 = time.perf_counter()
                op(i)
                times[i] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if self.pool is None:
            caller()
        else:
            for f in [self.pool.submit(caller) for _ in range(min(self.concurrency, len(indices)))]:
                f.result()
        return time.perf_counter() - t0, times

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _key(run_id: str, subject: Subject, i: int | str) -> str:
    return f"ectb-{run_id}-{subject.tag}-{i}"


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def _describe(job: Job, what: str, exc: BaseException) -> BenchError:
    return BenchError(f"{job.backend} {job.subject.kind}: {what} failed: {type(exc).__name__}: {exc}")


def _save_load(job: Job, phase: _Phase, keys: list[str], srcs: list[torch.Tensor], outs: list[torch.Tensor],
               device: str, blocked: list[float | None]) -> tuple[float, dict[int, float], float, dict[int, float]]:
    subject = job.subject

    def save(j: int) -> None:
        blocked[j] = subject.save(keys[j], srcs[j])

    def load(j: int) -> None:
        subject.load(keys[j], outs[j])
        _sync(device)

    scrub(outs)
    _sync(device)
    idx = list(range(len(keys)))
    try:
        save_wall, save_t = phase.run(save, idx)
    except Exception as exc:
        raise _describe(job, "save", exc) from exc
    try:
        load_wall, load_t = phase.run(load, idx)
    except Exception as exc:
        raise _describe(job, "load", exc) from exc
    for j, key in enumerate(keys):
        if not same_bits(outs[j], srcs[j]):
            raise BenchError(f"{job.backend} {subject.kind}: {key} came back with different bytes")
    try:
        subject.forget(keys)
    except Exception as exc:
        raise _describe(job, "cleanup", exc) from exc
    return save_wall, save_t, load_wall, load_t


def run_jobs(jobs: list[Job], workload: Workload, run_id: str, progress: Progress) -> list[Measured]:
    """Time every job on the workload's items; raise :class:`BenchError` on any failure."""
    n = workload.count
    results = [Measured(j.backend, j.subject.kind, [0.0] * n, [None] * n, [0.0] * n) for j in jobs]
    rounds = workload.rounds()
    srcs = workload.sources(len(rounds[0]))
    outs = workload.destinations(len(rounds[0]))
    phase = _Phase(workload.concurrency)
    try:
        for job in jobs:
            w = min(WARMUP_ITEMS, len(srcs))
            progress.label(f"{job.backend} {job.subject.kind} warm-up")
            keys = [_key(run_id, job.subject, f"warm{j}") for j in range(w)]
            _save_load(job, phase, keys, srcs[:w], outs[:w], workload.device, [None] * w)
        for r, items in enumerate(rounds):
            for j, i in enumerate(items):
                stamp(srcs[j], i)
            m = len(items)
            for k in range(len(jobs)):
                slot = (k + r) % len(jobs)
                job, res = jobs[slot], results[slot]
                progress.label(f"{job.backend} {job.subject.kind}")
                keys = [_key(run_id, job.subject, i) for i in items]
                blocked: list[float | None] = [None] * m
                sw, st, lw, lt = _save_load(job, phase, keys, srcs[:m], outs[:m], workload.device, blocked)
                res.save_wall_s += sw
                res.load_wall_s += lw
                for j, i in enumerate(items):
                    res.save_s[i], res.load_s[i], res.blocked_s[i] = st[j], lt[j], blocked[j]
                progress.advance(m)
    finally:
        phase.close()
    return results
