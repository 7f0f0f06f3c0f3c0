"""The repeated-image case: read latency of a tiered stack vs its remote tier alone, one run.

    .venv/bin/python benchmarks/tiered_repeat.py                          # spawns a redis-server
    .venv/bin/python benchmarks/tiered_repeat.py --redis-url redis://cache:6379/0 --reads 5
    .venv/bin/python benchmarks/tiered_repeat.py --json benchmarks/results/2026-12-02-tiered-repeat.json

A producer stack saves ``--count`` items (Qwen2.5-VL images by default: 1,296 x 3,584 bf16,
9.3 MB) and a separate consumer stack reads every item ``--reads`` times into preallocated
destinations, the way a prefill instance sees the same image (a logo, a video frame) in turn
after turn. Subjects, each a producer and a consumer opened apart (as two processes would):

* ``redis``: the remote tier alone;
* ``tiered memory->redis``: the consumer has a private memory tier in front of Redis; the
  producer writes around its own memory tier (it never reads its items back);
* ``tiered memory->fs(shm)->redis``: the same with an fs tier on /dev/shm between them (the
  producer writes around it too, so the first read still comes from Redis).

Each subject first saves and reads ``WARMUP_ITEMS`` other items untimed (connections, buffers).
Read passes interleave the subjects (the order rotates every pass), every read is verified bit
for bit after its clock stopped, and each item's first read is ``read1``, its second ``read2``
and so on. ``ectransfer-bench`` times one save and one load per item; this script is its
repeated-read companion and reuses its machine description and percentiles.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

import ectransfer
from ectransfer.backend import Backend
from ectransfer.bench.report import machine_info, now_utc, percentile
from ectransfer.bench.workload import WARMUP_ITEMS, Workload, same_bits, scrub
from ectransfer.config import parse_size, redact_url


def _stacks(redis_url: str, redis_options: dict[str, Any], memory_max: int, shm: Path | None,
            ) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """subject -> (producer options, consumer options) for :func:`ectransfer.open_backend`."""
    remote = {"url": redis_url, **redis_options}
    out = {"redis": (remote, remote)}
    out["tiered memory->redis"] = (
        {"backend": "tiered", "tiers": [{"url": "memory://", "write": "around"}, remote]},
        {"backend": "tiered", "tiers": [{"url": "memory://", "max_bytes": memory_max}, remote]})
    if shm is not None:
        fs = {"url": f"file://{shm}", "write": "around"}
        out["tiered memory->fs(shm)->redis"] = (
            {"backend": "tiered", "tiers": [{"url": "memory://", "write": "around"}, fs, remote]},
            {"backend": "tiered", "tiers": [{"url": "memory://", "max_bytes": memory_max}, fs, remote]})
    return out


def _open(options: dict[str, Any]) -> Backend[Any]:
    opts = dict(options)
    return ectransfer.open_backend(opts.pop("url", None), **opts)


def _row(subject: str, op: str, item_bytes: int, times: list[float]) -> dict[str, Any]:
    wall = sum(times)
    return {"subject": subject, "op": op, "item_bytes": item_bytes, "count": len(times),
            "mb_per_s": item_bytes * len(times) / wall / 1e6 if wall > 0 else None,
            "p50_ms": percentile(times, 50) * 1e3, "p99_ms": percentile(times, 99) * 1e3}


def run(args: argparse.Namespace, redis_url: str, redis_options: dict[str, Any]) -> dict[str, Any]:
    workload = Workload((args.tokens, args.hidden), torch.bfloat16, args.count, 1)
    srcs = workload.sources(args.count)
    outs = workload.destinations(args.count)
    run_id = uuid.uuid4().hex[:8]
    with contextlib.ExitStack() as stack:
        shm = None
        if not args.no_shm and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
            shm = Path(tempfile.mkdtemp(prefix="ectransfer-tiered-repeat-", dir="/dev/shm"))
            stack.callback(shutil.rmtree, shm, True)
        subjects = _stacks(redis_url, redis_options, args.memory_max, shm)
        opened = {name: (stack.enter_context(_open(p)), stack.enter_context(_open(c)))
                  for name, (p, c) in subjects.items()}
        keys = {name: [f"tr-{run_id}-{n}-{i}" for i in range(args.count)] for n, name in enumerate(opened)}
        for n, (producer, consumer) in enumerate(opened.values()):  # untimed: connections, buffers
            warm = [f"tr-{run_id}-{n}-warm{i}" for i in range(WARMUP_ITEMS)]
            for key, src, out in zip(warm, srcs, outs):
                producer.put(key, src)
                consumer.get_into(key, out)
                consumer.get_into(key, out)
            producer.delete(warm)
        save: dict[str, list[float]] = {name: [] for name in opened}
        for name, (producer, _) in opened.items():
            for key, src in zip(keys[name], srcs):
                t0 = time.perf_counter()
                producer.put(key, src)
                save[name].append(time.perf_counter() - t0)
        reads: dict[str, list[list[float]]] = {name: [] for name in opened}
        names = list(opened)
        for r in range(args.reads):
            for name in names[r % len(names):] + names[: r % len(names)]:
                consumer = opened[name][1]
                scrub(outs)
                times = []
                for key, out in zip(keys[name], outs):
                    t0 = time.perf_counter()
                    consumer.get_into(key, out)
                    times.append(time.perf_counter() - t0)
                for key, out, src in zip(keys[name], outs, srcs):
                    if not same_bits(out, src):
                        raise SystemExit(f"tiered_repeat: {name} read {r + 1} of {key} returned different bytes")
                reads[name].append(times)
        stats = {name: {k: v for k, v in consumer.stats().items() if v} for name, (_, consumer) in opened.items()}
        for name, (producer, _) in opened.items():
            producer.delete(keys[name])
    rows = []
    for name in opened:
        rows.append(_row(name, "save", workload.item_bytes, save[name]))
        rows += [_row(name, f"read{r + 1}", workload.item_bytes, t) for r, t in enumerate(reads[name])]
    return {"rows": rows, "stats": stats, "workload": workload.describe()}


def _ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["subject"], r["op"]): r for r in rows}
    out = []
    for subject in dict.fromkeys(r["subject"] for r in rows):
        if subject == "redis":
            continue
        for op in ("read1", "read2"):
            mine, alone = by.get((subject, op)), by.get(("redis", op))
            if mine and alone:
                out.append({"name": f"{op} p50: {subject} / redis alone",
                            "value": round(mine["p50_ms"] / alone["p50_ms"], 4)})
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("subject", "op", "MB/s", "p50 ms", "p99 ms")
    body = [(r["subject"], r["op"], f"{r['mb_per_s']:,.0f}", f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}") for r in rows]
    widths = [max(len(x[c]) for x in [head, *body]) for c in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) if c < 2 else v.rjust(w) for c, (v, w) in enumerate(zip(line, widths)))
                     for line in [head, *body])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--tokens", type=int, default=1296)
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--count", type=int, default=24, help="items per subject (default 24)")
    p.add_argument("--reads", type=int, default=3, help="reads of every item (default 3)")
    p.add_argument("--memory-max", type=lambda v: parse_size(v, what="--memory-max"), default=2 << 30,
                   help="max_bytes of the consumer's memory tier (default 2GiB)")
    p.add_argument("--no-shm", action="store_true", help="leave out the memory->fs(shm)->redis stack")
    p.add_argument("--redis-url", help="an existing server (default: spawn one on loopback)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if args.count < 1 or args.reads < 2:
        p.error("--count must be >= 1 and --reads >= 2 (the second read is the point)")
    torch.set_num_threads(1)  # a busy second core otherwise slows copies 50x (loopback notes)
    started = now_utc()
    with contextlib.ExitStack() as stack:
        if args.redis_url:
            redis_url, redis_options, where = args.redis_url, {}, "--redis-url"
        else:
            from ectransfer.testing.servers import redis as servers

            workdir = Path(tempfile.mkdtemp(prefix="ectransfer-tiered-repeat-redis-"))
            stack.callback(shutil.rmtree, workdir, True)
            server = stack.enter_context(servers.spawn(workdir))
            redis_url, redis_options, where = server.url, dict(server.options), "spawned redis-server on loopback"
        t0 = time.perf_counter()
        result = run(args, redis_url, redis_options)
        wall = time.perf_counter() - t0
    rows = result["rows"]
    print(f"tiered_repeat: {result['workload']}, {args.reads} reads each; redis: {redact_url(redis_url)} ({where})")
    print(_table(rows))
    ratios = _ratios(rows)
    for r in ratios:
        print(f"{r['name']}: {r['value']:.3f}x")
    if args.json is not None:
        doc = {"command": " ".join(["benchmarks/tiered_repeat.py", *argv]), "date": started[:10],
               "started_at": started, "wall_s": round(wall, 3), "machine": machine_info("cpu"),
               "config": {"workload": result["workload"], "reads": args.reads, "memory_max": args.memory_max,
                          "redis": redact_url(redis_url), "redis_where": where},
               "results": rows, "ratios": ratios, "consumer_stats": result["stats"]}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
