"""The scheduler side of the lifecycle: decide what to fetch, hold requests back until it is
verified, plan loads, and turn failures into per-request outcomes.

Item states, per item id (one state however many requests share the item)::

    (unknown) --lookup hit / announced--> FETCHING --all ranks ready--> READY --allocated--> (loaded)
                                              \\--failed / timed out--> FAILED --allocated--> (re-encoded)

* :meth:`ensure_available` (before a request is scheduled) starts fetches for the request's
  items that the store holds (or that the producer announced) and returns False while any is
  FETCHING; it never blocks longer than one bounded lookup.
* :meth:`has_item` is True only for READY items, so the engine plans an external load only for
  bytes that already sit verified in every worker's staging; a FAILED item reads as absent and
  the engine encodes it locally — or, when the request has no media to encode from (or the
  policy is ``fail``), the request is reported by :meth:`take_failed_requests`.
* :meth:`on_alloc` / :meth:`build_plan` put READY items into the step's plan.
* Items nobody waits for any more are dropped from worker staging.

Lookups are bounded by ``lookup_timeout_s`` on a helper thread; while a timed-out lookup is still
running, further lookups answer "absent" at once, so a stalled store costs one bounded wait, not
one per item.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from ectransfer.backend import Backend
from ectransfer.connector.channel import ChannelClient
from ectransfer.connector.options import ConnectorOptions, Role
from ectransfer.connector.plan import ItemRef, StepPlan, WorkerReport
from ectransfer.connector.stats import StatsRecorder, merge_stats
from ectransfer.errors import ECTransferError

__all__ = ["ItemSpec", "SchedulerSide"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ItemSpec:
    """One multimodal item of a request, as the engine describes it.

    start/end: the item's placeholder range in the prompt (token positions).
    has_media: the engine could encode it itself (its media is present).
    announced: the producer said it saved the item (so a first miss means "not yet").
    """

    ref: ItemRef
    start: int
    end: int
    has_media: bool = True
    announced: bool = False


class _State(enum.Enum):
    FETCHING = "fetching"
    READY = "ready"
    FAILED = "failed"


@dataclasses.dataclass
class _Item:
    ref: ItemRef
    state: _State
    since: float
    has_media: bool
    seq: int = 0  # which fetch the workers' events must name
    ready_ranks: int = 0
    reason: str = ""
    requests: set[str] = dataclasses.field(default_factory=set)


class SchedulerSide:
    """Scheduler-side bookkeeping; call it from the scheduler thread only."""

    def __init__(self, backend: Backend[Any] | None, channel: ChannelClient | None, role: Role,
                 options: ConnectorOptions, *, ranks: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self.channel = channel
        self.role = role
        self.options = options
        self.ranks = ranks
        self.clock = clock
        self.stats = StatsRecorder()
        self._items: dict[str, _Item] = {}
        self._by_request: dict[str, set[str]] = {}
        self._resident: set[str] = set()  # in the engine's encoder cache (allocated, not yet evicted)
        self._loads: list[ItemRef] = []
        self._failed_requests: set[str] = set()
        self._memo: dict[str, bool] = {}  # lookups answered during this step
        self._lookup_pool = ThreadPoolExecutor(1, thread_name_prefix="ectransfer-lookup") if backend else None
        self._stuck: Future[list[bool]] | None = None
        self._worker_stats: dict[str, Any] = {}
        self._saves_in_flight = 0
        self._seq = 0

    # ------------------------------------------------------------------ lookups
    def _lookup(self, refs: list[ItemRef]) -> list[bool]:
        """Which of ``refs`` the store holds now; bounded, absent on any doubt."""
        todo = [r for r in refs if r.item_id not in self._memo]
        if todo and self.backend is not None and self._lookup_pool is not None:
            answers = [False] * len(todo)
            if self._stuck is not None and not self._stuck.done():
                self.stats.add("lookups_skipped", len(todo))
            else:
                self._stuck = None
                future = self._lookup_pool.submit(self.backend.exists, [r.key for r in todo])
                try:
                    answers = future.result(timeout=self.options.lookup_timeout_s)
                except FutureTimeout:
                    self._stuck = future
                    self.stats.add("lookup_timeouts")
                    log.warning("ectransfer: lookup of %d item(s) took over lookup_timeout_s=%s; treating as misses",
                                len(todo), self.options.lookup_timeout_s)
                except ECTransferError as exc:
                    self.stats.add("lookup_errors")
                    log.warning("ectransfer: lookup failed (%s); treating as misses", exc)
                self.stats.add("lookups", len(todo))
            for r, hit in zip(todo, answers):
                self._memo[r.item_id] = bool(hit)
                self.stats.add("lookup_hits" if hit else "lookup_misses")
        return [self._memo.get(r.item_id, False) for r in refs]

    # ------------------------------------------------------------------ engine hooks
    def ensure_available(self, request_id: str, items: Iterable[ItemSpec], num_computed_tokens: int) -> bool:
        """True when no item the request still needs is in transit (see module docstring)."""
        if not self.role.consumes:
            return True
        self.poll()
        now = self.clock()
        needed = [s for s in items if s.end > num_computed_tokens and s.ref.item_id not in self._resident]
        unknown = [s for s in needed if s.ref.item_id not in self._items and not s.announced]
        hits = dict(zip((s.ref.item_id for s in unknown), self._lookup([s.ref for s in unknown])))
        to_fetch: list[ItemSpec] = []
        pending = False
        for spec in needed:
            item_id = spec.ref.item_id
            item = self._items.get(item_id)
            if item is None:
                if not (spec.announced or hits.get(item_id)):
                    continue  # a miss: the engine encodes it
                item = self._items[item_id] = _Item(spec.ref, _State.FETCHING, now, spec.has_media)
                to_fetch.append(spec)
            item.has_media = item.has_media and spec.has_media
            item.requests.add(request_id)
            self._by_request.setdefault(request_id, set()).add(item_id)
            if item.state is _State.FETCHING and now - item.since > self.options.load_timeout_s:
                self._fail(item, "timeout", f"not ready within load_timeout_s={self.options.load_timeout_s}")
            if item.state is _State.FETCHING:
                pending = True
            elif item.state is _State.FAILED and not self._can_reencode(item):
                # Never let it be scheduled: it would need an encoder output nobody can make.
                # take_failed_requests() ends it after this step.
                self._failed_requests.add(request_id)
                pending = True
        if to_fetch:
            self._send_fetch(to_fetch)
        if pending:
            self.stats.add("deferred")
        return not pending

    def _send_fetch(self, specs: list[ItemSpec]) -> None:
        self.stats.add("fetches_requested", len(specs))
        if self.channel is None:
            for s in specs:
                self._fail(self._items[s.ref.item_id], "error", "no worker channel to fetch through")
            return
        seqs = []
        for s in specs:
            self._seq += 1
            self._items[s.ref.item_id].seq = self._seq
            seqs.append(self._seq)
        self.channel.send({"op": "fetch", "items": [s.ref.to_wire() for s in specs], "seqs": seqs,
                           "announced": [s.announced for s in specs], "wait_s": self.options.load_timeout_s})

    def _can_reencode(self, item: _Item) -> bool:
        return item.has_media and self.options.on_load_failure == "reencode"

    def has_item(self, item_id: str, key: str | None = None) -> bool:
        """Whether the engine should plan an external load for ``item_id`` now."""
        if self.role.consumes:
            item = self._items.get(item_id)
            return item is not None and item.state is _State.READY
        if self.options.skip_existing and key is not None:
            # A pure producer need not encode what the store already holds.
            return self._lookup([ItemRef(item_id, key, 0)])[0]
        return False

    def on_alloc(self, request_id: str, ref: ItemRef) -> None:
        """The engine allocated encoder-cache space for ``ref`` (loaded or encoded locally)."""
        self._resident.add(ref.item_id)
        item = self._items.pop(ref.item_id, None)
        if item is None or not self.role.consumes:
            return
        for rid in item.requests:
            self._by_request.get(rid, set()).discard(ref.item_id)
        if item.state is _State.READY:
            self._loads.append(item.ref)
            self.stats.add("loads_planned")
        elif item.state is _State.FAILED:
            self.stats.add("reencodes")

    def build_plan(self, freed_item_ids: Iterable[str] = ()) -> StepPlan:
        """This step's plan; ``freed_item_ids`` left the engine's encoder cache."""
        self._resident.difference_update(freed_item_ids)
        plan = StepPlan(self._loads)
        self._loads = []
        self._memo.clear()
        return plan

    def request_finished(self, request_id: str) -> None:
        """Forget the request; drop staged items that no other request waits for."""
        self._failed_requests.discard(request_id)
        drop = []
        for item_id in self._by_request.pop(request_id, set()):
            item = self._items.get(item_id)
            if item is None:
                continue
            item.requests.discard(request_id)
            if not item.requests:
                del self._items[item_id]
                if item.state is not _State.FAILED:
                    drop.append(item_id)
        if drop and self.channel is not None:
            self.channel.send({"op": "drop", "ids": drop})
            self.stats.add("drops", len(drop))

    def take_failed_requests(self) -> set[str]:
        failed, self._failed_requests = self._failed_requests, set()
        if failed:
            self.stats.add("requests_failed", len(failed))
        return failed

    # ------------------------------------------------------------------ worker results
    def poll(self) -> None:
        """Apply the workers' control-channel events received so far."""
        if self.channel is None:
            return
        for ev in self.channel.poll():
            kind = ev.get("ev")
            item = self._items.get(str(ev.get("id")))
            if item is not None and ev.get("seq") != item.seq:
                continue  # an answer to an earlier fetch of the same item
            if kind == "ready" and item is not None and item.state is _State.FETCHING:
                item.ready_ranks += 1
                if item.ready_ranks >= self.ranks:
                    item.state = _State.READY
                    self.stats.add("items_ready")
            elif kind == "failed" and item is not None and item.state is not _State.FAILED:
                self._fail(item, str(ev.get("kind", "error")), str(ev.get("reason", "")))
            elif kind == "disconnected":
                log.warning("ectransfer: lost the control channel to a worker (%s)", ev.get("address"))

    def _fail(self, item: _Item, kind: str, reason: str) -> None:
        was_ready = item.state is _State.READY or item.ready_ranks > 0
        item.state = _State.FAILED
        item.reason = reason
        self.stats.add("items_failed")
        self.stats.add(f"items_failed_{kind}")
        log.warning("ectransfer: item %s unavailable (%s): %s", item.ref.item_id, kind, reason)
        if was_ready and self.channel is not None:  # other ranks staged it: free it there
            self.channel.send({"op": "drop", "ids": [item.ref.item_id]})
        if not self._can_reencode(item):
            self._failed_requests.update(item.requests)

    def on_worker_report(self, report: WorkerReport | None) -> None:
        if report is None:
            return
        self._worker_stats = merge_stats(self._worker_stats, report.stats)
        self._saves_in_flight = int(report.stats.get("gauges", {}).get("saves_in_flight", 0))

    def has_pending_work(self) -> bool:
        """A producer with saves in flight wants the engine to keep stepping (to report them)."""
        return self.role.produces and self._saves_in_flight > 0

    def take_stats(self) -> dict[str, Any]:
        """Scheduler and worker stats since the last call (``{}`` if none)."""
        data = merge_stats(self.stats.take(), self._worker_stats)
        self._worker_stats = {}
        return data

    @property
    def tracked_items(self) -> int:
        return len(self._items)

    def close(self) -> None:
        if self._lookup_pool is not None:
            self._lookup_pool.shutdown(wait=False, cancel_futures=True)
        if self.channel is not None:
            self.channel.close()
        if self.backend is not None:
            self.backend.close()
