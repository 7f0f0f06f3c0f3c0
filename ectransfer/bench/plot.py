"""``--plot PATH``: one PNG comparing the kinds per backend and operation.

Four panels: save, load and round-trip throughput (MB/s, higher is better), one group of bars
per backend and one bar per kind; and the time a save blocks its caller (ms, log scale, lower
is better). matplotlib comes from the ``bench`` extra and is imported only here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

__all__ = ["matplotlib_missing", "write_plot"]

_KIND_ORDER = ("ectransfer", "raw", "vllm-example", "ceiling")
_COLORS = {"ectransfer": "#1f77b4", "raw": "#7f7f7f", "vllm-example": "#ff7f0e", "ceiling": "#2ca02c"}


def matplotlib_missing() -> str | None:
    """None if matplotlib can be imported, else the install hint."""
    if importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib: pip install 'ectransfer[bench]'"
    return None


def write_plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys(r["backend"] for r in rows))
    kinds = [k for k in _KIND_ORDER if any(r["kind"] == k for r in rows)]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.8))
    width = 0.8 / max(1, len(kinds))
    panels: list[tuple[str, str, str]] = [("save", "mb_per_s", "save MB/s"), ("load", "mb_per_s", "load MB/s"),
                                          ("roundtrip", "mb_per_s", "round trip MB/s"),
                                          ("save", "blocked_ms", "save: caller blocked, ms (log)")]
    for ax, (op, field, label) in zip(axes, panels):
        for k, kind in enumerate(kinds):
            xs, ys = [], []
            for b, backend in enumerate(backends):
                row = next((r for r in rows if (r["backend"], r["kind"], r["op"]) == (backend, kind, op)), None)
                if row is not None and row[field] is not None:
                    xs.append(b + (k - (len(kinds) - 1) / 2) * width)
                    ys.append(row[field])
            if not xs:
                continue
            bars = ax.bar(xs, ys, width, label=kind, color=_COLORS.get(kind))
            ax.bar_label(bars, fmt="%.3g" if field == "blocked_ms" else "%.0f", fontsize=7, rotation=90,
                         padding=2)
        ax.set_xticks(range(len(backends)), backends, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        if field == "blocked_ms":
            ax.set_yscale("log")
        ax.margins(y=0.25)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
