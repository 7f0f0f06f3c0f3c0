"""The NIXL data-path choices of the backend, each measured against its alternative in one run.

    .venv/bin/python benchmarks/nixl_datapath.py
    .venv/bin/python benchmarks/nixl_datapath.py --json benchmarks/results/2026-12-02-nixl-datapath.json

* **progress threads**: CPU time an idle agent uses in one second, with NIXL's own
  ``nixl_agent`` configuration (its progress thread polls with a zero delay) and with the
  backend's (``new_nixl_agent``: a serving agent's thread waits in ``poll()``; a consumer has
  none); and a 9.3 MB READ with and without a progress thread in the initiating agent;
* **alignment**: a 9.3 MB READ from source offsets 0, 64, 256 (what the backend uses), 37 and
  232 bytes past a page, into a page-aligned destination;
* **first touch**: copying 9.3 MB into memory never written before vs into memory already
  faulted in (what the producer's arena does at creation), and what faulting in 512 MiB costs.

Variants are interleaved; medians. Same-host agents in one process, UCX ``cma``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ectransfer.backends.nixl.agent import import_nixl, new_nixl_agent
from ectransfer.bench.report import machine_info

N = 9_289_728  # one 1,296 x 3,584 bf16 item
PAD = 8192


def _median_ms(fn: Callable[[], None], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _idle_cpu(agents: list[Any]) -> float:
    """CPU-seconds this process uses in one idle second while ``agents`` exist."""
    del agents  # held alive
    t0 = time.process_time()
    time.sleep(1.0)
    return time.process_time() - t0


class _Pair:
    """A serving peer agent with a registered source, an initiator with a destination."""

    def __init__(self, initiator_progress: bool) -> None:
        tag = f"{os.getpid()}-{id(self):x}"
        self.peer = new_nixl_agent(f"dp-peer-{tag}", progress=True)
        self.ini = new_nixl_agent(f"dp-ini-{tag}", progress=initiator_progress)
        self.src = torch.randint(0, 255, (N + PAD,), dtype=torch.uint8)
        self.dst = torch.zeros(N, dtype=torch.uint8)
        self.peer.register_memory([(self.src.data_ptr(), N + PAD, 0, "")], "DRAM")
        self.ini.register_memory([(self.dst.data_ptr(), N, 0, "")], "DRAM")
        self.name = self.ini.add_remote_agent(self.peer.get_agent_metadata())

    def read(self, offset: int) -> None:
        a = self.ini
        handle = a.initialize_xfer("READ", a.get_xfer_descs([(self.dst.data_ptr(), N, 0)], "DRAM"),
                                   a.get_xfer_descs([(self.src.data_ptr() + offset, N, 0)], "DRAM"), self.name)
        state = a.transfer(handle)
        while state == "PROC":
            state = a.check_xfer_state(handle)
        a.release_xfer_handle(handle)
        if state != "DONE":
            raise SystemExit(f"READ failed: {state}")


def _run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    api = import_nixl()
    out: dict[str, Any] = {}

    # progress threads: idle CPU, one configuration at a time
    tag = os.getpid()
    stock = [api.nixl_agent(f"dp-stock-{tag}-{i}", api.nixl_agent_config(backends=["UCX"])) for i in range(2)]
    out["idle_cpu_s_per_s_two_stock_agents"] = _idle_cpu(stock)
    del stock
    ours = [new_nixl_agent(f"dp-serving-{tag}", progress=True), new_nixl_agent(f"dp-consumer-{tag}", progress=False)]
    out["idle_cpu_s_per_s_backend_producer_and_consumer"] = _idle_cpu(ours)
    del ours

    without, with_thread = _Pair(initiator_progress=False), _Pair(initiator_progress=True)
    reads: dict[str, list[float]] = {"initiator without progress thread": [], "initiator with progress thread": []}
    offsets = {"offset 0": 0, "offset 64": 64, "offset 256": 256, "offset 37": 37, "offset 232": 232}
    aligned: dict[str, list[float]] = {k: [] for k in offsets}
    for _ in range(args.rounds):
        reads["initiator without progress thread"].append(_median_ms(lambda: without.read(0), args.repeat))
        reads["initiator with progress thread"].append(_median_ms(lambda: with_thread.read(0), args.repeat))
        for k, off in offsets.items():
            aligned[k].append(_median_ms(lambda off=off: without.read(off), args.repeat))
    out["read_ms"] = {k: statistics.median(v) for k, v in reads.items()}
    out["read_ms_by_source_offset"] = {k: statistics.median(v) for k, v in aligned.items()}

    # first touch: a fresh region per copy vs one region written before
    src = np.frombuffer(without.src.numpy()[:N].tobytes(), dtype=np.uint8)
    warm = np.zeros(N, dtype=np.uint8)
    fresh_ms, warm_ms = [], []
    for _ in range(args.rounds * 4):
        region = torch.empty(N, dtype=torch.uint8).numpy()  # untouched pages (mmap-backed at this size)
        fresh_ms.append(_median_ms(lambda region=region: np.copyto(region, src), 1))
        warm_ms.append(_median_ms(lambda: np.copyto(warm, src), 1))
    out["copy_ms_into_fresh_memory"] = statistics.median(fresh_ms)
    out["copy_ms_into_faulted_memory"] = statistics.median(warm_ms)
    arena = torch.empty(512 << 20, dtype=torch.uint8)
    t0 = time.perf_counter()
    arena.numpy().fill(0)
    out["fault_in_512MiB_ms"] = (time.perf_counter() - t0) * 1e3
    return {"command": "python benchmarks/nixl_datapath.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
            "machine": machine_info("cpu"), "load_average": os.getloadavg(), "item_bytes": N, "results": out,
            "threads_at_end": threading.active_count()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    result = _run(args)
    print(json.dumps(result["results"], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    sys.stdout.flush()
    os._exit(0)  # skip NIXL's native atexit handlers (see the NIXL/libibverbs note)


if __name__ == "__main__":
    sys.exit(main())
