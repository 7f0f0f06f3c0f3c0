#!/usr/bin/env python3
"""Plots of the H200 runs (committed next to their JSON in benchmarks/results/).

    python benchmarks/plot_gpu.py    # writes 2026-12-02-h200-cuda-single-image.png and 2026-12-02-h200-gpu-datapath.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ectransfer.bench.plot import write_plot

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    bench = json.loads((RESULTS / "2026-12-02-h200-cuda-single-image.json").read_text())
    write_plot(RESULTS / "2026-12-02-h200-cuda-single-image.png", bench["results"],
               "ectransfer-bench --device cuda, NVIDIA H200, 9.3 MB items")

    worker = json.loads((RESULTS / "2026-12-02-h200-gpu-worker-warm.json").read_text())
    nixl = json.loads((RESULTS / "2026-12-02-h200-nixl-vram-probe-tls-cuda-ipc.json").read_text())
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels, save, load, ceil = [], [], [], []
    for row in worker["results"]:
        for backend in ("fs_devshm", "memory"):
            warm = row[backend]["warm"]
            labels.append(f"{backend}\n{row['scenario'].split()[0]} {warm['item_bytes'] / 1e6:.0f} MB")
            save.append(warm["save_mb_s"] / 1e3)
            load.append(warm["load_mb_s"] / 1e3)
            ceil.append(row["ceilings"]["pinned_h2d_mb_s"] / 1e3)
    x = range(len(labels))
    left.bar([i - 0.2 for i in x], save, 0.4, label="save (device tensor -> store)")
    left.bar([i + 0.2 for i in x], load, 0.4, label="load (store -> device encoder cache)")
    left.plot(list(x), ceil, "k_", markersize=30, label="pinned H2D ceiling (same run)")
    left.set_xticks(list(x), labels, fontsize=8)
    left.set_ylabel("GB/s")
    left.set_title("connector worker side, CUDA tensors (warm)")
    left.legend(fontsize=8)
    sizes = [r["bytes"] / 2**20 for r in nixl["sizes"]]
    right.plot(sizes, [r["read_gb_s"] for r in nixl["sizes"]], "o-", label="NIXL READ (pull), 2 processes")
    right.plot(sizes, [r["write_gb_s"] for r in nixl["sizes"]], "o-", label="NIXL WRITE (push), 2 processes")
    right.plot(sizes, [r["torch_d2d_gb_s"] for r in nixl["sizes"]], "k--", label="torch copy, same GPU")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("transfer size (MiB)")
    right.set_ylabel("GB/s")
    right.set_title("VRAM -> VRAM, two processes, one H200")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "2026-12-02-h200-gpu-datapath.png", dpi=110)


if __name__ == "__main__":
    main()
