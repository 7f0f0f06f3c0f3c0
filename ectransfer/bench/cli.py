"""``ectransfer-bench`` entry point (minimal: fs backend in a temporary directory)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from ectransfer.registry import open_backend

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ectransfer-bench")
    parser.add_argument("--count", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    item = torch.randn(1296, 3584).to(torch.bfloat16)
    nbytes = item.numel() * item.element_size()
    with tempfile.TemporaryDirectory(prefix="ectransfer-bench-") as d, open_backend(f"file://{d}") as be:
        t0 = time.perf_counter()
        for i in range(args.count):
            be.put(f"item-{i}", item)
        t1 = time.perf_counter()
        out = torch.empty_like(item)
        for i in range(args.count):
            be.get_into(f"item-{i}", out)
        t2 = time.perf_counter()
    total = nbytes * args.count
    print(f"fs  save {total / (t1 - t0) / 1e6:8.0f} MB/s  load {total / (t2 - t1) / 1e6:8.0f} MB/s"
          f"  ({args.count} x {nbytes / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
