"""Where the fs backend's time goes, against plain file I/O (9.3 MB items; /dev/shm and /tmp).

    .venv/bin/python benchmarks/fs_profile.py

Three measurements, each interleaved item by item so a busy moment hits every variant alike:

1. ``put``/``get_into`` with the payload page-aligned in the file (what the backend does) and
   with the plain 8-byte-aligned safetensors header, next to a raw ``os.write``/``os.preadv``;
2. the steps of one put and one load timed separately (checksum, directory, write, rename;
   open and header, read, verify);
3. whether computing the checksum chunk by chunk, while the chunk is still in cache, would pay
   (the codec hashes the whole payload before the write and after the read today).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import xxhash

import ectransfer.backends.fs as fsmod
from ectransfer import open_backend
from ectransfer.bench.raw.fs import Raw
from ectransfer.codec import encode, parse_header, payload_view, verify_payload

N, REPS, CHUNK = int(os.environ.get("FS_PROFILE_N", 16)), int(os.environ.get("FS_PROFILE_REPS", 10)), 256 << 10
ITEM = (1296, 3584)


def _items() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    n = ITEM[0] * ITEM[1] * 2
    items = [torch.randint(0, 256, (n,), dtype=torch.uint8).view(torch.bfloat16).reshape(ITEM) for _ in range(N)]
    return items, [torch.zeros_like(x) for x in items]


def _report(title: str, times: dict[str, list[float]]) -> None:
    print(f"== {title} (ms: p50 / min over {len(next(iter(times.values())))})")
    for k, v in times.items():
        print(f"  {k:30s} {statistics.median(v) * 1e3:7.3f} {min(v) * 1e3:7.3f}")


def alignment(base: str, items: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
    aligned = fsmod._page_aligned
    d = tempfile.mkdtemp(dir=base)
    a, b, raw = open_backend(d + "/a"), open_backend(d + "/b"), Raw(d + "/r", {})
    names = ("put unaligned", "put aligned", "raw write", "get unaligned", "get aligned", "raw read")
    t: dict[str, list[float]] = {k: [] for k in names}

    def tm(k: str, f: Callable[[], object]) -> None:
        t0 = time.perf_counter()
        f()
        t[k].append(time.perf_counter() - t0)

    try:
        for _ in range(REPS):
            for i, x in enumerate(items):
                fsmod._page_aligned = lambda h, n: h  # type: ignore[assignment]
                tm("put unaligned", lambda: a.put(f"k{i}", x))  # noqa: B023 - called at once
                fsmod._page_aligned = aligned
                tm("put aligned", lambda: b.put(f"k{i}", x))  # noqa: B023
                tm("raw write", lambda: raw.write(f"k{i}", payload_view(x)))  # noqa: B023
            for i, x in enumerate(items):
                for k, f in (("get unaligned", lambda: a.get_into(f"k{i}", outs[i])),  # noqa: B023
                             ("get aligned", lambda: b.get_into(f"k{i}", outs[i])),  # noqa: B023
                             ("raw read", lambda: raw.read_into(f"k{i}", payload_view(outs[i])))):  # noqa: B023
                    tm(k, f)
                    assert torch.equal(outs[i].view(torch.uint8), x.view(torch.uint8))
            keys = [f"k{i}" for i in range(N)]
            a.delete(keys)
            b.delete(keys)
            for k in keys:
                raw.delete(k)
    finally:
        fsmod._page_aligned = aligned
    _report(f"{base}: fs backend vs plain file I/O", t)


def steps(base: str, items: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
    d = tempfile.mkdtemp(dir=base)
    t: dict[str, list[float]] = {}

    def tick(k: str, t0: float) -> float:
        now = time.perf_counter()
        t.setdefault(k, []).append(now - t0)
        return now

    for _ in range(REPS):
        for i, x in enumerate(items):
            s = time.perf_counter()
            e = encode(x)
            s = tick("put: encode (checksum)", s)
            os.makedirs(f"{d}/c{i}")
            s = tick("put: mkdir", s)
            fd = os.open(f"{d}/c{i}/.t", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            s = tick("put: open temp file", s)
            fsmod._write_all(fd, fsmod._page_aligned(e.header, len(e.payload)))
            fsmod._write_all(fd, e.payload)
            s = tick("put: write", s)
            os.close(fd)
            os.replace(f"{d}/c{i}/.t", f"{d}/c{i}/f")
            tick("put: close + rename", s)
        for i in range(N):
            s = time.perf_counter()
            fd = os.open(f"{d}/c{i}/f", os.O_RDONLY)
            os.fstat(fd)
            h = parse_header(os.pread(fd, 4096, 0))
            s = tick("load: open + header", s)
            v = payload_view(outs[i])
            fsmod._read_exact(fd, v, h.header_len)
            s = tick("load: read", s)
            verify_payload(h, v)
            tick("load: verify (checksum)", s)
            os.close(fd)
        for i in range(N):
            os.unlink(f"{d}/c{i}/f")
            os.rmdir(f"{d}/c{i}")
    _report(f"{base}: steps of one put and one load", t)


def fused(base: str, items: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
    d = tempfile.mkdtemp(dir=base)
    names = ("write: hash all, then write", "write: hash+write per chunk", "write only",
             "read: read all, then hash", "read: read+hash per chunk", "read only")
    t: dict[str, list[float]] = {k: [] for k in names}

    def mv(x: torch.Tensor) -> memoryview:
        return payload_view(x)

    def write(path: str, x: torch.Tensor, mode: str) -> None:
        v, h = mv(x), xxhash.xxh3_64()
        if mode == "all":
            h.update(v)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for off in range(0, len(v), CHUNK):
            c = v[off:off + CHUNK]
            if mode == "chunk":
                h.update(c)
            while c:
                c = c[os.write(fd, c):]
        os.close(fd)

    def read(path: str, o: torch.Tensor, mode: str) -> None:
        v, h = mv(o), xxhash.xxh3_64()
        fd = os.open(path, os.O_RDONLY)
        for off in range(0, len(v), CHUNK):
            c = v[off:off + CHUNK]
            os.preadv(fd, [c], off)
            if mode == "chunk":
                h.update(c)
        os.close(fd)
        if mode == "all":
            h.update(v)

    modes = (("all", names[0], names[3]), ("chunk", names[1], names[4]), ("none", names[2], names[5]))
    for _ in range(REPS // 2):
        for i, x in enumerate(items):
            for mode, wname, _r in modes:
                t0 = time.perf_counter()
                write(f"{d}/{mode}{i}", x, mode)
                t[wname].append(time.perf_counter() - t0)
        for i in range(N):
            for mode, _w, rname in modes:
                t0 = time.perf_counter()
                read(f"{d}/{mode}{i}", outs[i], mode)
                t[rname].append(time.perf_counter() - t0)
        for i in range(N):
            for mode, _w, _r in modes:
                os.unlink(f"{d}/{mode}{i}")
    _report(f"{base}: checksum fused with the copy? ({CHUNK >> 10} KiB chunks)", t)


def main() -> None:
    torch.set_num_threads(1)
    items, outs = _items()
    for base in ("/dev/shm", "/tmp"):
        if os.path.isdir(base):
            alignment(base, items, outs)
            steps(base, items, outs)
            fused(base, items, outs)


if __name__ == "__main__":
    main()
