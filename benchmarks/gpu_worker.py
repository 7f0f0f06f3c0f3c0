#!/usr/bin/env python3
"""The connector's worker side with CUDA tensors: what vLLM's engine pays, and what a load costs.

For each backend (fs on /dev/shm, memory) and item size, in one run:

* **save**: ``WorkerSide.save`` of CUDA tensors (the encoder outputs) — the time the caller is
  blocked (``blocked_ms``: the device-to-host copy is only *started*, on a side stream, into a
  reused pinned buffer) and the time until the save completed;
* **load**: a fetch (backend read into pinned staging, verified) then ``WorkerSide.load`` into a
  CUDA encoder cache (a non-blocking host-to-device copy on a side stream; the caller's stream
  waits for it) — end-to-end MB/s, with every item checked bit for bit afterwards;
* the same-run ceilings: pinned D2H and H2D copies of the same bytes.

    python3 benchmarks/gpu_worker.py --json out.json            # on a CUDA machine
    python3 benchmarks/gpu_worker.py --device cpu --count 4      # the same code paths, no GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

import torch

from ectransfer import open_backend
from ectransfer.connector.options import ConnectorOptions
from ectransfer.connector.plan import ItemRef, StepPlan
from ectransfer.connector.worker import WorkerSide


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ceilings(nbytes: int, device: torch.device, reps: int = 20) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    out = {}
    for name, fn in (("pinned_d2h_mb_s", lambda: pinned.copy_(dev, non_blocking=True)),
                     ("pinned_h2d_mb_s", lambda: dev.copy_(pinned, non_blocking=True))):
        fn()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        out[name] = nbytes * reps / (time.perf_counter() - t0) / 1e6
    return out


def _one_pass(producer: WorkerSide, consumer: WorkerSide, tokens: int, hidden: int, count: int,
              device: torch.device) -> dict[str, Any]:
    items = [torch.randn(tokens, hidden, device=device).to(torch.bfloat16) for _ in range(count + 2)]
    nbytes = items[0].numel() * items[0].element_size()
    keys = [f"gpu-{uuid.uuid4().hex[:8]}-{i}" for i in range(len(items))]
    # save: blocked time per call, then wall time until every save completed
    _sync(device)
    blocked = []
    t0 = time.perf_counter()
    for k, t in zip(keys, items):
        b0 = time.perf_counter()
        producer.save(k, k, t)
        blocked.append((time.perf_counter() - b0) * 1e3)
    producer._saver.flush(120)  # type: ignore[union-attr]
    save_s = time.perf_counter() - t0
    report = producer.report()
    assert report is not None and len(report.saved) == len(keys), report

    # load: fetch into staging (verified), then move into a device encoder cache
    done = threading.Semaphore(0)
    failed: list[dict[str, Any]] = []

    def reply(ev: dict[str, Any]) -> None:
        if ev["ev"] != "ready":
            failed.append(ev)
        done.release()

    refs = [ItemRef(k, k, tokens, "image") for k in keys]
    warm, timed = refs[:2], refs[2:]
    cache: dict[str, torch.Tensor] = {}
    for ref in warm:  # the first fetch learns the layout (later ones land with get_into)
        consumer.fetch(ref, reply, wait_s=0, announced=False)
        done.acquire()
    consumer.load(StepPlan(warm), cache)
    _sync(device)
    t0 = time.perf_counter()
    for ref in timed:
        consumer.fetch(ref, reply, wait_s=0, announced=False)
    for _ in timed:
        done.acquire()
    consumer.load(StepPlan(timed), cache)
    _sync(device)
    load_s = time.perf_counter() - t0
    assert not failed, failed
    exact = all(torch.equal(cache[k].view(torch.uint8), t.view(torch.uint8)) for k, t in zip(keys, items))
    consumer.drop(keys)
    return {"item_bytes": nbytes, "count": len(timed),
            "save_blocked_p50_ms": statistics.median(blocked), "save_blocked_max_ms": max(blocked),
            "save_item_ms": save_s / len(keys) * 1e3, "save_mb_s": nbytes * len(keys) / save_s / 1e6,
            "load_mb_s": nbytes * len(timed) / load_s / 1e6, "bit_exact": exact,
            "blocked_vs_item": statistics.median(blocked) / (save_s / len(keys) * 1e3)}


def run_backend(url: str, tokens: int, hidden: int, count: int, device: torch.device) -> dict[str, Any]:
    """A first pass (staging buffers allocated as needed: "cold"), then the same again ("warm")."""
    options = ConnectorOptions(max_inflight_bytes=4 << 30, max_staged_bytes=8 << 30, load_threads=4)
    producer = WorkerSide(open_backend(url), options, produce=True, consume=False)
    consumer = WorkerSide(open_backend(url), options, produce=False, consume=True, device=device)
    try:
        cold = _one_pass(producer, consumer, tokens, hidden, count, device)
        warm = _one_pass(producer, consumer, tokens, hidden, count, device)
        return {"url": url.split("?")[0], "cold": cold, "warm": warm}
    finally:
        producer.close()
        consumer.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--count", type=int, default=24)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA here; use --device cpu", file=sys.stderr)
        return 2
    machine = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    results = []
    for tokens, label in ((1296, "single image 9.3 MB"), (18136, "video 130 MB")):
        count = args.count if tokens < 10000 else max(2, args.count // 8)
        nbytes = tokens * 3584 * 2
        row: dict[str, Any] = {"scenario": label, "ceilings": ceilings(nbytes, device)}
        with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
            row["fs_devshm"] = run_backend(f"file://{d}", tokens, 3584, count, device)
        row["memory"] = run_backend(f"memory://gpu-{uuid.uuid4().hex[:6]}", tokens, 3584, count, device)
        results.append(row)
        print(json.dumps(row), flush=True)
    out = {"command": " ".join(["python3", *sys.argv]), "date": time.strftime("%Y-%m-%d"), "machine": machine,
           "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
