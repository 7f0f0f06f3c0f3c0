"""``ectransfer-bench``: every transport side by side, against its raw client and vLLM's example.

With no arguments: the fs backend in a temporary directory on /dev/shm, Qwen2.5-VL-sized items
(1,296 tokens x 3,584 hidden, bf16: 9.3 MB), about 2 GB in all, a table on stdout.
See ``docs/benchmarks.md`` for every flag, how URLs are matched to backends, and the JSON.

Exit codes: 0 done; 2 bad arguments (the message says which, on one line); 1 a transfer
failed or returned wrong bytes during the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, NoReturn

import torch

from ectransfer.bench.kinds import EctransferSubject, RawSubject
from ectransfer.bench.plot import matplotlib_missing
from ectransfer.bench.progress import Progress
from ectransfer.bench.report import compare, machine_info, now_utc, rows_for, table, write_json
from ectransfer.bench.runner import BenchError, Job, Measured, run_jobs
from ectransfer.bench.targets import Skip, Target, TargetError, Targets
from ectransfer.bench.workload import DTYPES, ROUND_BYTES, WARMUP_ITEMS, Workload
from ectransfer.config import parse_size, redact_url
from ectransfer.errors import ConfigError

__all__ = ["main"]

DEFAULT_TOKENS = 1296
DEFAULT_HIDDEN = 3584
#: with no --count: about this many bytes in all (215 Qwen2.5-VL images), within the bounds below
DEFAULT_TOTAL_BYTES = 2 * 10**9
DEFAULT_COUNT_BOUNDS = (8, 2000)


class UsageError(Exception):
    """Bad arguments: printed on one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ectransfer-bench", description="Throughput of every ectransfer transport, side by side "
                "with its raw client and vLLM's ECExampleConnector.")
    p.add_argument("--backend", action="append", metavar="NAME",
                   help="backend to run (repeatable); 'all' = every registered one; s3 = fsspec (default: fs)")
    p.add_argument("--url", action="append", metavar="URL", default=[],
                   help="where a backend lives: NAME=URL, or a URL whose scheme names it (a plain path is fs)")
    p.add_argument("--tokens", type=_positive, help=f"rows per item (default {DEFAULT_TOKENS})")
    p.add_argument("--hidden", type=_positive, help=f"columns per item (default {DEFAULT_HIDDEN})")
    p.add_argument("--dtype", default="bfloat16", help="item dtype (default bfloat16)")
    p.add_argument("--size", metavar="BYTES", help="item size instead of --tokens, e.g. 8MiB or 1000000")
    p.add_argument("--count", type=_positive, help="items per backend and kind (default: about 2 GB in all)")
    p.add_argument("--concurrency", type=_positive, default=1, help="callers saving/loading at once (default 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where items and destinations live")
    p.add_argument("--baseline", action="store_true", help="also time each backend's raw client on the same bytes")
    p.add_argument("--vllm-example", action="store_true",
                   help="also time vLLM's ECExampleConnector on the fs backend's directory")
    p.add_argument("--spawn", action="store_true", help="start a local server for backends that need one")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG comparing kinds per backend and op")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def workload_from(args: argparse.Namespace) -> Workload:
    """The items the arguments describe; raises :class:`UsageError`."""
    dtype = DTYPES.get(args.dtype.lower())
    if dtype is None:
        raise UsageError(f"--dtype {args.dtype!r} is not one of: {', '.join(DTYPES)}")
    hidden = args.hidden or DEFAULT_HIDDEN
    if args.size is not None:
        if args.tokens is not None:
            raise UsageError("give --size or --tokens, not both")
        try:
            nbytes = parse_size(args.size, what="--size")
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        if nbytes == 0 or nbytes % dtype.itemsize:
            raise UsageError(f"--size {args.size}: must be a positive multiple of {dtype.itemsize} bytes ({args.dtype})")
        elems = nbytes // dtype.itemsize
        shape: tuple[int, ...] = (elems // hidden, hidden) if elems % hidden == 0 else (elems,)
    else:
        shape = (args.tokens or DEFAULT_TOKENS, hidden)
    item_bytes = dtype.itemsize
    for d in shape:
        item_bytes *= d
    count = args.count
    if count is None:
        lo, hi = DEFAULT_COUNT_BOUNDS
        count = max(lo, min(hi, round(DEFAULT_TOTAL_BYTES / item_bytes)))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda: no CUDA device is available here (torch {torch.__version__})")
    workload = Workload(shape, dtype, count, args.concurrency, args.device)
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = 0
    need = 3 * workload.round_size * item_bytes  # sources, destinations, stored copies
    if mem and need > 0.75 * mem:
        raise UsageError(f"a round of {workload.round_size} items of {item_bytes:,} B needs about {need / 1e9:.1f} GB; "
                         f"this machine has {mem / 1e9:.1f} GB: lower --concurrency or the item size")
    return workload


def _check_output(flag: str, path: Path | None) -> None:
    if path is not None and not path.parent.resolve().is_dir():
        raise UsageError(f"{flag} {path}: directory {path.parent} does not exist")


def _one_line(text: str, limit: int = 400) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _redact_arg(arg: str) -> str:
    head, eq, tail = arg.partition("=")
    if eq and "://" in tail and "://" not in head:
        return f"{head}={redact_url(tail)}"
    return redact_url(arg) if "://" in arg else arg


def _jobs(targets: Targets, target: Target, workload: Workload, args: argparse.Namespace,
          vllm_reason: str | None) -> list[Job]:
    jobs = [Job(target.name, EctransferSubject(target.writer, target.reader, item_bytes=workload.item_bytes,
                                               concurrency=workload.concurrency))]
    if args.baseline:
        client = targets.raw_client(target)
        if isinstance(client, str):
            targets.skips.append(Skip(target.name, "raw", client))
        else:
            jobs.append(Job(target.name, RawSubject(client, item_bytes=workload.item_bytes,
                                                    concurrency=workload.concurrency, device=workload.device)))
    if args.vllm_example and target.name == "fs":
        if vllm_reason is not None:
            targets.skips.append(Skip("fs", "vllm-example", vllm_reason))
        elif target.fs_root is not None:
            from ectransfer.bench.vllm_example import VllmExampleSubject

            try:
                jobs.append(Job("fs", VllmExampleSubject(target.fs_root)))
            except Exception as exc:  # noqa: BLE001 - vLLM refusing this host is a skip reason
                targets.skips.append(Skip("fs", "vllm-example", f"cannot build ECExampleConnector: "
                                          f"{type(exc).__name__}: {exc}"))
    return jobs


def _config(args: argparse.Namespace, argv: list[str], workload: Workload, targets: Targets,
            started: str) -> dict[str, Any]:
    return {
        "command": " ".join(["ectransfer-bench", *(_redact_arg(a) for a in argv)]),
        "started_at": started,
        "backends": [{"backend": t.name, "url": t.shown_url, "where": t.where, "peer_to_peer": t.peer_to_peer}
                     for t in targets.targets],
        "shape": list(workload.shape), "dtype": str(workload.dtype).removeprefix("torch."),
        "item_bytes": workload.item_bytes, "count": workload.count, "concurrency": workload.concurrency,
        "device": workload.device, "baseline": args.baseline, "vllm_example": args.vllm_example,
        "spawn": args.spawn, "round_items": workload.round_size, "round_bytes_max": ROUND_BYTES,
        "warmup_items": WARMUP_ITEMS,
        "skipped": [{"backend": s.backend, "kind": s.kind, "reason": s.reason} for s in targets.skips],
    }


def run(args: argparse.Namespace, argv: list[str]) -> int:
    workload = workload_from(args)
    _check_output("--json", args.json)
    _check_output("--plot", args.plot)
    if args.plot is not None and (missing := matplotlib_missing()):
        raise UsageError(missing)
    torch.set_num_threads(1)  # a busy second core otherwise slows copies 50x (loopback notes)
    run_id = uuid.uuid4().hex[:8]
    started = now_utc()
    with Targets(run_id) as targets:
        try:
            targets.resolve(args.backend or [], args.url, spawn=args.spawn)
        except TargetError as exc:
            raise UsageError(str(exc)) from None
        vllm_reason = None
        if args.vllm_example:
            if not any(t.name == "fs" for t in targets.targets):
                targets.skips.append(Skip("-", "vllm-example", "it runs on the fs backend's directory: add --backend fs"))
            else:
                from ectransfer.bench.vllm_example import vllm_unavailable_reason

                vllm_reason = vllm_unavailable_reason()
        jobs = [j for t in targets.targets for j in _jobs(targets, t, workload, args, vllm_reason)]
        machine = machine_info(workload.device)
        print(f"ectransfer-bench: {workload.describe()}, concurrency {workload.concurrency}, "
              f"device {workload.device}")
        print(f"machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), torch {machine['torch']}"
              + (f", {machine['gpu']} (driver {machine['gpu_driver']})" if machine["gpu"] else ""))
        for t in targets.targets:
            p2p = "; peer-to-peer: producer and consumer in this process (the same-host path)" if t.peer_to_peer else ""
            print(f"{t.name}: {t.shown_url} ({t.where}{p2p})")
        for s in targets.skips:
            print(f"skipped: {s.backend} {s.kind}: {_one_line(s.reason)}")
        sys.stdout.flush()
        progress = Progress(workload.count * len(jobs), enabled=not args.quiet)
        t0 = time.perf_counter()
        try:
            measured = run_jobs(jobs, workload, run_id, progress)
        finally:
            progress.close()
            for job in jobs:
                job.subject.close()
        ceilings: list[Measured] = []
        if workload.device == "cuda":
            from ectransfer.bench.ceilings import measure_ceilings

            ceilings = measure_ceilings(workload)
        if hasattr(os, "getloadavg"):
            machine["loadavg"] = list(os.getloadavg())  # how busy the machine was during the run
        config = _config(args, argv, workload, targets, started)
        config["wall_s"] = round(time.perf_counter() - t0, 3)
    rows = [r for m in measured for r in rows_for(m, workload.item_bytes, workload.concurrency)]
    rows += [r for m in ceilings for r in rows_for(m, workload.item_bytes, 1)]
    print()
    print(table(rows))
    lines = compare(rows)
    if lines:
        print()
        print("\n".join(lines))
    if args.json is not None:
        write_json(args.json, machine, config, rows)
        print(f"\nwrote {args.json}")
    if args.plot is not None:
        from ectransfer.bench.plot import write_plot

        write_plot(args.plot, rows, f"ectransfer-bench: {workload.describe()}, concurrency {workload.concurrency}, "
                                    f"{machine['cpu_count']} CPUs, {workload.device}, {started[:10]}")
        print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(build_parser().parse_args(argv), argv)
    except UsageError as exc:
        print(f"ectransfer-bench: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except BenchError as exc:
        print(f"ectransfer-bench: failed: {_one_line(str(exc))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
