#!/usr/bin/env python3
"""Raw NIXL VRAM -> VRAM between two processes on one GPU (READ and WRITE) vs a torch D2D copy.

The ceiling for a NIXL backend with device arenas: which UCX path two processes on one GPU
get (``cuda_ipc`` or a fallback), and how READ (consumer pulls) compares with WRITE (producer
pushes). Needs the ``nixl`` package and a CUDA GPU.

    python3 benchmarks/nixl_vram_probe.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from typing import Any

SIZES = [9289728, 64 << 20, 256 << 20]
REPS = 20


def _wait(agent: Any, handle: Any, deadline_s: float = 60.0) -> str:
    state = agent.transfer(handle)
    end = time.monotonic() + deadline_s
    while state == "PROC":
        if time.monotonic() > end:
            return "TIMEOUT"
        state = agent.check_xfer_state(handle)
    return str(state)


def target(conn: Any) -> None:
    import torch
    from nixl._api import nixl_agent, nixl_agent_config

    torch.cuda.set_device(0)
    agent = nixl_agent("target", nixl_agent_config(backends=["UCX"]))
    bufs = [torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda") for n in SIZES]
    regs = [agent.register_memory(b) for b in bufs]
    conn.send((agent.get_agent_metadata(), [agent.get_serialized_descs(agent.get_xfer_descs(b)) for b in bufs],
               [int(b.to(torch.int64).sum()) for b in bufs]))
    agent.add_remote_agent(conn.recv())
    conn.recv()  # initiator's WRITEs are done: report what landed
    conn.send([int(b.to(torch.int64).sum()) for b in bufs])
    conn.recv()
    for r in regs:
        agent.deregister_memory(r)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    args = p.parse_args()
    import torch
    from nixl._api import nixl_agent, nixl_agent_config

    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=target, args=(there,))
    proc.start()
    torch.cuda.set_device(0)
    agent = nixl_agent("initiator", nixl_agent_config(backends=["UCX"]))
    md, blobs, sums = here.recv()
    agent.add_remote_agent(md)
    here.send(agent.get_agent_metadata())
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "sizes": []}
    locals_ = [torch.zeros(n, dtype=torch.uint8, device="cuda") for n in SIZES]
    regs = [agent.register_memory(t) for t in locals_]
    for n, blob, expect, local in zip(SIZES, blobs, sums, locals_):
        remote = agent.deserialize_descs(blob)
        row: dict[str, Any] = {"bytes": n}
        for op in ("READ", "WRITE"):
            if op == "WRITE":
                local.fill_(7)
            torch.cuda.synchronize()
            handle = agent.initialize_xfer(op, agent.get_xfer_descs(local), remote, "target")
            state = _wait(agent, handle)  # warm-up (connection set-up)
            reuse = True
            t0 = time.perf_counter()
            for _ in range(REPS):
                try:
                    state = _wait(agent, handle) if reuse else "?"
                except Exception:  # noqa: BLE001 - a handle that cannot be re-posted: a new one each time
                    reuse = False
                if not reuse:
                    agent.release_xfer_handle(handle)
                    handle = agent.initialize_xfer(op, agent.get_xfer_descs(local), remote, "target")
                    state = _wait(agent, handle)
                if state != "DONE":
                    break
            dt = time.perf_counter() - t0
            row[f"{op.lower()}_handle_reused"] = reuse
            agent.release_xfer_handle(handle)
            row[f"{op.lower()}_state"] = state
            row[f"{op.lower()}_gb_s"] = n * REPS / dt / 1e9 if state == "DONE" else None
            if op == "READ":
                row["read_bit_exact"] = int(local.to(torch.int64).sum()) == expect
        src, dst = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8,
                                                                                                  device="cuda")
        dst.copy_(src)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(REPS):
            dst.copy_(src)
        torch.cuda.synchronize()
        row["torch_d2d_gb_s"] = n * REPS / (time.perf_counter() - t0) / 1e9  # bytes moved (read + write = 2x)
        results["sizes"].append(row)
        print(json.dumps(row), flush=True)
    here.send("writes done")
    landed = here.recv()
    results["write_bit_exact"] = all(s == 7 * n for s, n in zip(landed, SIZES))
    here.send("bye")
    proc.join(60)
    for r in regs:
        agent.deregister_memory(r)
    print(json.dumps({"write_bit_exact": results["write_bit_exact"]}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
