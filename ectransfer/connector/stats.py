"""Transfer statistics: counters, gauges and latency samples as a plain dict.

The dict form (``{"counters": {...}, "gauges": {...}, "latency_ms": {...}}``) is what travels
from workers to the scheduler and on to vLLM's stats logger and Prometheus; it holds only
numbers and lists of numbers, so it pickles and msgpacks. Counters add up (across workers and
across intervals); gauges add up across workers (each reports its own level) but the later
value wins across intervals; latency samples are concatenated, capped at :data:`MAX_SAMPLES`.

Names are documented in docs/vllm.md ("Metrics").
"""

from __future__ import annotations

import statistics
import threading
from typing import Any

__all__ = ["MAX_SAMPLES", "StatsRecorder", "merge_stats", "summarize"]

MAX_SAMPLES = 1000


def _empty() -> dict[str, Any]:
    return {"counters": {}, "gauges": {}, "latency_ms": {}}


def merge_stats(a: dict[str, Any], b: dict[str, Any], *, sum_gauges: bool = False) -> dict[str, Any]:
    """A new dict holding both (``b`` is the later interval); either may be empty (``{}``).

    ``sum_gauges=True`` merges two workers of one step (their levels add up); otherwise ``b``'s
    gauges replace ``a``'s (a later reading of the same worker).
    """
    out = _empty()
    for src in (a, b):
        for name, v in src.get("counters", {}).items():
            out["counters"][name] = out["counters"].get(name, 0) + v
        for name, v in src.get("gauges", {}).items():
            out["gauges"][name] = out["gauges"].get(name, 0) + v if sum_gauges else v
        for name, samples in src.get("latency_ms", {}).items():
            merged = out["latency_ms"].setdefault(name, [])
            merged.extend(samples[: MAX_SAMPLES - len(merged)])
    if not any(out.values()):
        return {}
    return out


def _quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(data: dict[str, Any]) -> dict[str, int | float]:
    """One flat line of numbers for a log: counters, gauges, latency mean/p50/p99."""
    out: dict[str, int | float] = {}
    out.update(data.get("counters", {}))
    out.update(data.get("gauges", {}))
    for name, samples in data.get("latency_ms", {}).items():
        if samples:
            out[f"{name}_mean_ms"] = round(statistics.fmean(samples), 3)
            out[f"{name}_p50_ms"] = round(_quantile(samples, 0.5), 3)
            out[f"{name}_p99_ms"] = round(_quantile(samples, 0.99), 3)
    return out


class StatsRecorder:
    """Thread-safe accumulation; :meth:`take` returns the interval's dict and starts a new one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data = _empty()
        self._gauges: dict[str, float] = {}

    def add(self, name: str, n: float = 1) -> None:
        with self._lock:
            c = self._data["counters"]
            c[name] = c.get(name, 0) + n

    def observe(self, name: str, ms: float) -> None:
        with self._lock:
            samples = self._data["latency_ms"].setdefault(name, [])
            if len(samples) < MAX_SAMPLES:
                samples.append(round(ms, 4))

    def set_gauge(self, name: str, value: float) -> None:
        with self._lock:
            self._gauges[name] = value

    def take(self) -> dict[str, Any]:
        """This interval's stats (``{}`` if nothing happened); gauges are always current."""
        with self._lock:
            data, self._data = self._data, _empty()
            data["gauges"] = dict(self._gauges)
        if not data["counters"] and not data["latency_ms"] and not any(data["gauges"].values()):
            return {}
        return data
