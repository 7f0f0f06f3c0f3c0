"""Turn timings into result rows, the table on stdout, the ratios against the targets, the JSON.

Result rows follow the issue's schema exactly (see ``docs/benchmarks.md``)::

    {"backend", "kind", "op", "item_bytes", "count", "concurrency",
     "mb_per_s", "p50_ms", "p99_ms", "blocked_ms"}

``mb_per_s`` is 10^6 bytes per second of wall time over the phase; ``p50_ms``/``p99_ms`` are
per-item latencies (linear interpolation between ranks); ``blocked_ms`` is the median time a
save blocks its caller: the ``AsyncSaver.submit`` call for ectransfer, the whole call for
synchronous kinds (raw clients, vLLM's example connector, ceilings); null for loads and round trips.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from ectransfer.bench.runner import Measured

__all__ = ["OPS", "compare", "machine_info", "percentile", "rows_for", "table", "write_json"]

OPS = ("save", "load", "roundtrip")
ROW_KEYS = ("backend", "kind", "op", "item_bytes", "count", "concurrency", "mb_per_s", "p50_ms", "p99_ms",
            "blocked_ms")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between closest ranks; NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _row(backend: str, kind: str, op: str, item_bytes: int, concurrency: int, per_item: Sequence[float],
         wall_s: float, blocked: float | None) -> dict[str, Any]:
    count = len(per_item)
    return {
        "backend": backend, "kind": kind, "op": op, "item_bytes": item_bytes, "count": count,
        "concurrency": concurrency,
        "mb_per_s": item_bytes * count / wall_s / 1e6 if wall_s > 0 else math.inf,
        "p50_ms": percentile(per_item, 50) * 1e3, "p99_ms": percentile(per_item, 99) * 1e3,
        "blocked_ms": None if blocked is None else blocked * 1e3,
    }


def rows_for(m: Measured, item_bytes: int, concurrency: int) -> list[dict[str, Any]]:
    """The save, load and roundtrip rows of one measured job (only load when it saved nothing)."""
    if not m.save_s:
        return [_row(m.backend, m.kind, "load", item_bytes, concurrency, m.load_s, m.load_wall_s, None)]
    if all(b is not None for b in m.blocked_s):
        blocked = percentile([b for b in m.blocked_s if b is not None], 50)
    else:  # a synchronous save blocks its caller for all of it
        blocked = percentile(m.save_s, 50)
    rt = [s + lo for s, lo in zip(m.save_s, m.load_s)]
    return [
        _row(m.backend, m.kind, "save", item_bytes, concurrency, m.save_s, m.save_wall_s, blocked),
        _row(m.backend, m.kind, "load", item_bytes, concurrency, m.load_s, m.load_wall_s, None),
        _row(m.backend, m.kind, "roundtrip", item_bytes, concurrency, rt, m.save_wall_s + m.load_wall_s, None),
    ]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on (no host names, no user names)."""
    from ectransfer import __version__

    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = None
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(), "cpu_model": _cpu_model(), "memory_bytes": mem,
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "ectransfer": __version__, "device": device,
        "gpu": None, "gpu_driver": None, "cuda": None,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(0), gpu_driver=_gpu_driver(), cuda=torch.version.cuda)
    return info


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def table(rows: list[dict[str, Any]]) -> str:
    """The results as an aligned text table."""
    head = ("backend", "kind", "op", "MB/s", "items/s", "p50 ms", "p99 ms", "blocked ms")
    body = []
    for r in rows:
        items_s = r["mb_per_s"] * 1e6 / r["item_bytes"] if r["item_bytes"] else math.nan
        body.append((r["backend"], r["kind"], r["op"], f"{r['mb_per_s']:,.0f}", f"{items_s:,.1f}",
                     _fmt_ms(r["p50_ms"]), _fmt_ms(r["p99_ms"]), _fmt_ms(r["blocked_ms"])))
    widths = [max(len(str(x[c])) for x in [head, *body]) for c in range(len(head))]
    lines = []
    for line in [head, *body]:
        cells = [str(v).ljust(w) if c < 3 else str(v).rjust(w) for c, (v, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _find(rows: list[dict[str, Any]], backend: str, kind: str, op: str) -> dict[str, Any] | None:
    return next((r for r in rows if (r["backend"], r["kind"], r["op"]) == (backend, kind, op)), None)


def compare(rows: list[dict[str, Any]]) -> list[str]:
    """One line per comparison the issue sets a target for, marked ok or MISSED."""
    def mark(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    lines = []
    for backend in dict.fromkeys(r["backend"] for r in rows if r["kind"] == "ectransfer"):
        ec_save, ec_rt = _find(rows, backend, "ectransfer", "save"), _find(rows, backend, "ectransfer", "roundtrip")
        vx_save, vx_rt = _find(rows, backend, "vllm-example", "save"), _find(rows, backend, "vllm-example", "roundtrip")
        raw_rt = _find(rows, backend, "raw", "roundtrip")
        assert ec_save is not None and ec_rt is not None
        if vx_save is not None and vx_rt is not None:
            r = ec_save["blocked_ms"] / vx_save["p50_ms"]
            lines.append(f"{backend}: save blocks the caller {ec_save['blocked_ms']:.3f} ms = {r:.3f}x vllm-example's "
                         f"save ({vx_save['p50_ms']:.2f} ms)  [target <= 0.1x: {mark(r <= 0.1)}]")
            r = ec_rt["mb_per_s"] / vx_rt["mb_per_s"]
            lines.append(f"{backend}: round trip {r:.2f}x vllm-example  [target >= 1.0x: {mark(r >= 1.0)}]")
        if raw_rt is not None:
            parts = []
            for op in ("save", "load"):
                ec, raw = _find(rows, backend, "ectransfer", op), _find(rows, backend, "raw", op)
                if ec is not None and raw is not None:
                    parts.append(f"{op} {ec['mb_per_s'] / raw['mb_per_s']:.2f}x")
            r = ec_rt["mb_per_s"] / raw_rt["mb_per_s"]
            lines.append(f"{backend}: vs raw client: {', '.join(parts)}, round trip {r:.2f}x  "
                         f"[target >= 0.9x: {mark(r >= 0.9)}]")
    return lines


def _clean(v: Any) -> Any:
    """JSON has no NaN/Infinity: write null for them."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def write_json(path: Path, machine: dict[str, Any], config: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Write ``{"machine", "config", "results"}`` (results rows with exactly :data:`ROW_KEYS`)."""
    doc = {"machine": machine, "config": config, "results": [{k: r[k] for k in ROW_KEYS} for r in rows]}
    path.write_text(json.dumps(_clean(doc), indent=1) + "\n")


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def print_lines(lines: list[str], stream: TextIO) -> None:
    for line in lines:
        print(line, file=stream)
