"""GPU data-path probe: ceilings and the fs/memory backends with CUDA tensors (one run).

Run on a CUDA machine from the repository root:  PYTHONPATH=. python3 benchmarks/gpu_probe.py
Prints JSON: pinned/pageable D2H and H2D, D2D, and per-backend save/load of CUDA tensors
(blocked time of AsyncSaver.submit, end-to-end MB/s), verifying every loaded item bit-exact.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

import torch

from ectransfer import open_backend
from ectransfer.connector.saver import AsyncSaver


def _timed_cuda(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def ceilings(nbytes: int) -> dict[str, float]:
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev2 = torch.empty_like(dev)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    out = {}
    out["pinned_d2h_gbps"] = nbytes / _timed_cuda(lambda: pinned.copy_(dev, non_blocking=True), 20) / 1e9
    out["pinned_h2d_gbps"] = nbytes / _timed_cuda(lambda: dev.copy_(pinned, non_blocking=True), 20) / 1e9
    out["pageable_d2h_gbps"] = nbytes / _timed_cuda(lambda: pageable.copy_(dev), 10) / 1e9
    out["d2d_gbps_rw"] = 2 * nbytes / _timed_cuda(lambda: dev2.copy_(dev), 50) / 1e9
    t0 = time.perf_counter()
    torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    out["fresh_pinned_alloc_ms"] = (time.perf_counter() - t0) * 1e3
    return out


def backend_run(url: str, shape: tuple[int, int], count: int) -> dict[str, float]:
    items = [torch.randn(shape, device="cuda").to(torch.bfloat16) for _ in range(count)]
    nbytes = items[0].numel() * 2
    with open_backend(url) as be:
        saver = AsyncSaver(be, max_inflight_bytes=256 << 20)
        for i in range(2):  # warm up staging buffers and the backend
            saver.submit(f"warm{i}", items[i]).result()
        blocked = []
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        futs = []
        for i, t in enumerate(items):
            s = time.perf_counter()
            futs.append(saver.submit(f"k{i}", t))
            blocked.append(time.perf_counter() - s)
        for f in futs:
            f.result()
        save_s = time.perf_counter() - t0
        outs = [torch.empty_like(t) for t in items]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i, o in enumerate(outs):
            be.get_into(f"k{i}", o)
        torch.cuda.synchronize()
        load_s = time.perf_counter() - t0
        ok = all(torch.equal(a, b) for a, b in zip(items, outs))
        saver.close()
    return {"item_bytes": nbytes, "count": count, "save_mb_s": nbytes * count / save_s / 1e6,
            "load_mb_s": nbytes * count / load_s / 1e6, "blocked_p50_ms": statistics.median(blocked) * 1e3,
            "per_item_save_ms": save_s / count * 1e3, "bit_exact": ok}


def main() -> int:
    torch.set_num_threads(4)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "ceilings_9.3MB": ceilings(1296 * 3584 * 2), "ceilings_128MiB": ceilings(128 << 20)}
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        report["fs_devshm_9.3MB"] = backend_run(f"file://{d}", (1296, 3584), 32)
    report["memory_9.3MB"] = backend_run("memory://", (1296, 3584), 32)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
