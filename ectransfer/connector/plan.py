"""What crosses between the scheduler side and the worker side, as plain picklable data.

* :class:`ItemRef` names one multimodal item: ``item_id`` is what the engine's encoder cache is
  keyed by (vLLM's ``mm_hash``), ``key`` the storage key the backend uses for it.
* :class:`StepPlan` travels with each engine step (vLLM's connector metadata): the items to
  move from worker staging into the encoder cache this step. Fetches do not travel here: they
  go over the control channel (:mod:`ectransfer.connector.channel`) at once, because a step in
  which every request waits for its items runs no worker code at all.
* :class:`WorkerReport` travels back (vLLM's worker metadata), one per worker, merged across
  tensor-parallel ranks with :meth:`WorkerReport.merge`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["ItemRef", "StepPlan", "WorkerReport"]


@dataclasses.dataclass(frozen=True)
class ItemRef:
    item_id: str
    key: str
    num_embeds: int
    modality: str = ""

    def to_wire(self) -> list[Any]:
        return [self.item_id, self.key, self.num_embeds, self.modality]

    @classmethod
    def from_wire(cls, raw: list[Any]) -> ItemRef:
        item_id, key, num_embeds, modality = raw
        return cls(str(item_id), str(key), int(num_embeds), str(modality))


@dataclasses.dataclass
class StepPlan:
    """Items the worker moves from staging into the encoder cache in this step."""

    load: list[ItemRef] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.load)


@dataclasses.dataclass
class WorkerReport:
    """What one step of one (or several merged) workers did.

    saved: item ids whose save completed, with how many workers saved them.
    save_failed: item id -> reason.
    stats: counters and latency samples (see :mod:`ectransfer.connector.stats`).
    """

    saved: dict[str, int] = dataclasses.field(default_factory=dict)
    save_failed: dict[str, str] = dataclasses.field(default_factory=dict)
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)

    def merge(self, other: WorkerReport) -> WorkerReport:
        from ectransfer.connector.stats import merge_stats

        saved = dict(self.saved)
        for k, n in other.saved.items():
            saved[k] = saved.get(k, 0) + n
        return WorkerReport(saved, {**self.save_failed, **other.save_failed},
                            merge_stats(self.stats, other.stats, sum_gauges=True))

    def is_empty(self) -> bool:
        return not (self.saved or self.save_failed or self.stats)
