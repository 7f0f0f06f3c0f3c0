"""Where a NIXL load's time goes, against the raw READ of the same bytes, in one run.

    .venv/bin/python benchmarks/nixl_floor.py
    .venv/bin/python benchmarks/nixl_floor.py --json benchmarks/results/2026-12-02-nixl-floor.json

``ectransfer-bench --backend nixl --baseline`` compares the backend's ``get_into`` with a bare
NIXL READ (:class:`ectransfer.bench.raw.nixl.Raw`). A load through the backend must also do
what the READ leaves out: ask the producer where the entry is (one control round trip, which
also pins it) and verify the landed bytes against the entry's checksum. This script measures
those parts on the same items, interleaved, in one process (the bench's same-host path):

* ``raw READ``: the baseline (register the destination, READ, deregister);
* ``raw READ + checksum``: the same READ, then the xxh3-64 verification of what landed — the
  fastest load that still detects corruption (no lookup, no Python of ours in between);
* ``raw READ + checksum, N pieces``: the READ in N transfers (``--pieces``), each piece hashed
  right after it landed (in cache); ``overlapped``: hashed on a second thread while the next
  piece moves (both calls release the GIL);
* ``control round trip``: one ``exists`` request to the backend's producer (what a lookup
  costs on the wire, without its pin);
* ``backend get_into``: the nixl backend (lookup, READ, verify), with ``hash_beside`` off (one
  READ, then the checksum) and on (2 MiB pieces hashed on a second thread as they land).

Items are ``--count`` distinct tensors; as in a bench round, a variant loads every item, then
(untimed) every destination is checked bit for bit and scrubbed, so caches are as cold as there.
``--repeat`` passes, each running every variant in turn. Medians per item.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from ectransfer import open_backend
from ectransfer.bench.raw.nixl import Raw
from ectransfer.bench.report import machine_info
from ectransfer.codec import PayloadVerifier, encode, parse_header, payload_view
from ectransfer.testing.servers import free_port


def _run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # as ectransfer-bench
    shape = (1296, 3584)
    items = [torch.randn(shape).to(torch.bfloat16) for _ in range(args.count)]
    outs = [torch.empty(shape, dtype=torch.bfloat16) for _ in range(args.count)]
    headers = [parse_header(encode(t).header) for t in items]
    n = len(payload_view(items[0]))
    url = f"nixl://127.0.0.1:{free_port()}"
    opts = {"arena_bytes": 2 * n * args.count + (64 << 20), "lease_s": 600.0, "exists_cache_s": 0.0}
    writer = open_backend(url, role="producer", **opts)
    reader = open_backend(url, role="consumer", hash_beside="off", **opts)
    beside_reader = open_backend(url, role="consumer", hash_beside="on", **opts)
    raw = Raw(url, opts)
    hashed: queue.SimpleQueue[tuple[PayloadVerifier, memoryview] | None] = queue.SimpleQueue()
    done: queue.SimpleQueue[None] = queue.SimpleQueue()

    def hasher() -> None:
        while (job := hashed.get()) is not None:
            job[0].update(job[1])
            done.put(None)

    thread = threading.Thread(target=hasher, daemon=True)
    thread.start()
    try:
        for i, t in enumerate(items):
            writer.put(f"k{i}", t)
            raw.write(f"k{i}", payload_view(t))
        client = reader._consumer._peers.all[0].client  # type: ignore[attr-defined]

        def raw_read(i: int) -> None:
            raw.read_into(f"k{i}", payload_view(outs[i]))

        def raw_checked(i: int) -> None:
            raw.read_into(f"k{i}", payload_view(outs[i]))
            v = PayloadVerifier(headers[i])
            v.update(payload_view(outs[i]))
            v.finish()

        slot_of = raw._slots  # the raw peer's slots: READ pieces of them

        def raw_pieces(i: int, pieces: int, overlap: bool) -> None:
            view = payload_view(outs[i])
            base = slot_of[f"k{i}"].offset
            v = PayloadVerifier(headers[i])
            step = -(-n // pieces)
            starts = list(range(0, n, step))
            for s in starts:
                raw._xfer("READ", view[s:s + step], base + s)
                if overlap:
                    hashed.put((v, view[s:s + step]))
                else:
                    v.update(view[s:s + step])  # right after it landed, still in cache
            if overlap:
                for _ in starts:
                    done.get()
            v.finish()

        def round_trip(i: int) -> None:
            client.request({"op": "exists", "keys": [f"k{i}"]}, 5.0)

        def backend(i: int) -> None:
            reader.get_into(f"k{i}", outs[i])

        def backend_beside(i: int) -> None:
            beside_reader.get_into(f"k{i}", outs[i])

        variants: dict[str, Callable[[int], None]] = {"raw READ": raw_read, "raw READ + checksum": raw_checked}
        for pieces in args.pieces:
            variants[f"raw READ + checksum, {pieces} pieces"] = partial(raw_pieces, pieces=pieces, overlap=False)
            variants[f"raw READ + checksum, {pieces} pieces overlapped"] = partial(raw_pieces, pieces=pieces,
                                                                                   overlap=True)
        variants.update({"control round trip": round_trip, "backend get_into, hash_beside=off": backend,
                         "backend get_into, hash_beside=on": backend_beside})
        times: dict[str, list[float]] = {k: [] for k in variants}
        for p in range(args.repeat + 1):
            for name, fn in variants.items():
                for i in range(args.count):  # as a bench round: the destinations are not in cache
                    t0 = time.perf_counter()
                    fn(i)
                    dt = (time.perf_counter() - t0) * 1e3
                    if p:  # pass 0 warms every path up
                        times[name].append(dt)
                for i in range(args.count):  # untimed: check, then scrub for the next variant
                    if name != "control round trip" and not torch.equal(outs[i].view(torch.int16),
                                                                        items[i].view(torch.int16)):
                        raise SystemExit(f"{name}: item {i} came back with different bytes")
                    outs[i].zero_()
    finally:
        hashed.put(None)
        raw.close()
        beside_reader.close()
        reader.close()
        writer.close()
    base = statistics.median(times["raw READ"])
    rows = [{"variant": k, "p50_ms": statistics.median(v), "ratio_raw_over_variant": base / statistics.median(v)}
            for k, v in times.items()]
    return {"command": "python benchmarks/nixl_floor.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"), "machine": machine_info("cpu"),
            "load_average": os.getloadavg(), "item_bytes": n, "count": args.count, "repeat": args.repeat,
            "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=28)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--pieces", type=int, nargs="*", default=[4, 16])
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    result = _run(args)
    print(f"{args.count} items of {result['item_bytes']:,} B, {args.repeat} passes, medians "
          f"(load average {result['load_average'][0]:.2f})")
    for r in result["rows"]:
        print(f"  {r['variant']:42s} {r['p50_ms']:7.3f} ms   raw READ / this = {r['ratio_raw_over_variant']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    sys.stdout.flush()
    os._exit(0)  # skip NIXL's native atexit handlers (see the NIXL/libibverbs note)


if __name__ == "__main__":
    sys.exit(main())
