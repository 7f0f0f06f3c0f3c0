"""vLLM-facing statistics: the logger's ``ECConnectorStats`` and the Prometheus metrics.

The data dict is :mod:`ectransfer.connector.stats`'s form; every metric name is listed in
docs/vllm.md ("Metrics").
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.ec_transfer.ec_connector.metrics import ECConnectorPromMetrics, ECConnectorStats
from vllm.v1.metrics.utils import create_metric_per_engine

from ectransfer.connector.stats import merge_stats, summarize

__all__ = ["COUNTERS", "GAUGES", "HISTOGRAMS", "ECTransferPromMetrics", "ECTransferStats"]

#: counter name in the stats dict -> help text (exported as ``vllm:ectransfer_<name>_total``)
COUNTERS: dict[str, str] = {
    "saves": "Encoder-cache items saved",
    "save_bytes": "Bytes of encoder-cache items saved",
    "save_failures": "Saves that failed",
    "fetches": "Items fetched and verified into staging",
    "fetch_bytes": "Bytes fetched into staging",
    "fetch_missing": "Fetches that found no entry",
    "fetch_corrupt": "Fetches that found a corrupt entry (never served)",
    "fetch_timeout": "Fetches that timed out",
    "fetch_capacity": "Fetches refused for lack of staging room",
    "fetch_shape": "Fetches whose item had another number of embeddings than the request",
    "fetch_error": "Fetches that failed otherwise",
    "loads": "Items moved into the encoder cache",
    "load_bytes": "Bytes moved into the encoder cache",
    "lookups": "Scheduler existence checks",
    "lookup_hits": "Existence checks that found the item",
    "lookup_misses": "Existence checks that did not (the item is encoded locally)",
    "lookup_timeouts": "Existence checks that exceeded lookup_timeout_s",
    "lookup_errors": "Existence checks that failed",
    "deferred": "Scheduling attempts deferred until a request's items were ready",
    "items_failed": "Items that could not be obtained",
    "reencodes": "Items encoded locally after their transfer failed",
    "requests_failed": "Requests failed because an item could not be obtained or re-encoded",
}
#: gauge name -> help text (exported as ``vllm:ectransfer_<name>``)
GAUGES: dict[str, str] = {
    "staged_bytes": "Bytes fetched and waiting to be loaded",
    "save_inflight_bytes": "Bytes of saves in flight",
}
#: latency sample name -> help text (exported as ``vllm:ectransfer_<name>_seconds``)
HISTOGRAMS: dict[str, str] = {
    "save_blocked": "Time the engine was blocked handing an item to the saver",
    "save": "Time from hand-over to a completed save",
    "fetch": "Time to fetch and verify an item",
}
_BUCKETS = [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


class ECTransferStats(ECConnectorStats):
    """Stats of one interval; aggregation merges dicts (see :func:`merge_stats`)."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: ECConnectorStats) -> ECTransferStats:
        return ECTransferStats(data=merge_stats(self.data, other.data))

    def reduce(self) -> dict[str, int | float]:
        return summarize(self.data)

    def is_empty(self) -> bool:
        return not self.data


class ECTransferPromMetrics(ECConnectorPromMetrics):
    def __init__(self, vllm_config: Any, metric_types: Any, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        # vLLM types these as a union of the three classes; each is used as what it is.
        counter_cls: Any = self._counter_cls
        gauge_cls: Any = self._gauge_cls
        histogram_cls: Any = self._histogram_cls
        self.counters: dict[str, dict[int, Any]] = {
            name: create_metric_per_engine(
                counter_cls(name=f"vllm:ectransfer_{name}", documentation=doc, labelnames=labelnames),
                per_engine_labelvalues)
            for name, doc in COUNTERS.items()
        }
        self.gauges: dict[str, dict[int, Any]] = {
            name: create_metric_per_engine(
                gauge_cls(name=f"vllm:ectransfer_{name}", documentation=doc, labelnames=labelnames,
                                multiprocess_mode="mostrecent"),
                per_engine_labelvalues)
            for name, doc in GAUGES.items()
        }
        self.backend_stats = gauge_cls(
            name="vllm:ectransfer_backend", documentation="Backend-specific readings (Backend.stats())",
            labelnames=[*labelnames, "stat"], multiprocess_mode="mostrecent")
        self.per_engine_labelvalues = per_engine_labelvalues
        self.histograms: dict[str, dict[int, Any]] = {
            name: create_metric_per_engine(
                histogram_cls(name=f"vllm:ectransfer_{name}_seconds", documentation=doc,
                                    buckets=_BUCKETS, labelnames=labelnames),
                per_engine_labelvalues)
            for name, doc in HISTOGRAMS.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in transfer_stats_data.get("counters", {}).items():
            metric = self.counters.get(name)
            if metric is not None and value > 0:
                metric[engine_idx].inc(value)
        for name, value in transfer_stats_data.get("gauges", {}).items():
            metric = self.gauges.get(name)
            if metric is not None:
                metric[engine_idx].set(value)
            elif name.startswith("backend_"):
                labels = self.per_engine_labelvalues.get(engine_idx, [])
                self.backend_stats.labels(*labels, name.removeprefix("backend_")).set(value)
        for name, samples in transfer_stats_data.get("latency_ms", {}).items():
            metric = self.histograms.get(name)
            if metric is not None:
                for ms in samples:
                    metric[engine_idx].observe(ms / 1e3)
