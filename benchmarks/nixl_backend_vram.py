#!/usr/bin/env python3
"""The NIXL backend with its producer arena in device memory: two processes on one machine.

A producer process (``arena_device=cuda``, fed over a pipe) holds the entries in VRAM; this
process is the consumer and loads them with the backend's NIXL READs, into host tensors and
into CUDA tensors (through the backend's host staging). Every item is checked bit for bit.

    python3 benchmarks/nixl_backend_vram.py                     # needs CUDA and nixl
    python3 benchmarks/nixl_backend_vram.py --arena-device cpu  # the same path with a DRAM arena
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from ectransfer import open_backend
from ectransfer.testing import make_tensor, same_bits
from ectransfer.testing.servers import free_port
from ectransfer.testing.servers.nixl import start_producer


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--arena-device", default="cuda")
    p.add_argument("--count", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(1)
    url = f"nixl://127.0.0.1:{free_port()}"
    producer = start_producer(url, role="producer", arena_device=args.arena_device, arena_bytes="2GiB",
                              timeout_s=60.0)
    consumer = open_backend(url, role="consumer", timeout_s=60.0)
    out: dict[str, object] = {"arena_device": args.arena_device}
    try:
        items = [make_tensor((1296, 3584), torch.bfloat16, seed=i) for i in range(args.count)]
        for i, t in enumerate(items):
            producer.put(f"v{i}", t)
        nbytes = items[0].numel() * 2
        for dest in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            outs = [torch.empty_like(t, device=dest) for t in items]
            consumer.get_into("v0", outs[0])  # warm-up: agent, connection
            t0 = time.perf_counter()
            for i in range(1, len(items)):
                consumer.get_into(f"v{i}", outs[i])
            if dest == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            out[f"load_into_{dest}_mb_s"] = nbytes * (len(items) - 1) / dt / 1e6
            out[f"load_into_{dest}_bit_exact"] = all(same_bits(o.cpu(), t) for o, t in zip(outs, items))
            print(json.dumps(out), flush=True)
    finally:
        consumer.close()
        producer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
