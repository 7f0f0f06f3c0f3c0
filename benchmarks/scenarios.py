"""Run the benchmark scenarios of ``benchmarks/README.md`` and write their results.

    .venv/bin/python benchmarks/scenarios.py                      # every scenario, 3 repeats
    .venv/bin/python benchmarks/scenarios.py --scenario single-image --repeat 5

Each scenario is one or more *variants* (fs on /dev/shm, fs on /tmp, every backend); each
variant is one ``ectransfer-bench`` command, run ``--repeat`` times in fresh processes. The
result is ``<out>/<date>-<scenario>.json``::

    {"scenario", "date", "description",
     "variants": {NAME: {"command", "runs": [<ectransfer-bench --json document>, ...],
                         "spread": [{"backend", "kind", "op", "mb_per_s": [min, median, max],
                                     "p50_ms": [...], "blocked_ms": [...]}],
                         "ratios": [{"name", "values": [one per run]}]}}}

and, for the scenarios that draw one, ``<out>/<date>-<scenario>.png`` (the plot of the run whose
fs round trip vs raw ratio is the median). Other work on the machine changes the absolute
numbers from run to run: read the spread, and compare kinds through the ratios, which come from
one run each (the kinds of a run interleave round by round).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SINGLE = ["--tokens", "1296", "--hidden", "3584"]  # Qwen2.5-VL image: 9,289,728 B
FS_KINDS = ["--baseline", "--vllm-example"]

#: scenario -> (description, {variant: bench arguments}, variant to plot or None); "{tmp}" is a
#: fresh directory under /tmp, removed after the run
SCENARIOS: dict[str, tuple[str, dict[str, list[str]], str | None]] = {
    "single-image": (
        "one Qwen2.5-VL image (1,296 x 3,584 bf16, 9.3 MB) per item",
        {"fs-shm": [*SINGLE, "--count", "100", *FS_KINDS],
         "fs-tmp": [*SINGLE, "--count", "100", *FS_KINDS, "--url", "fs={tmp}"],
         "all": [*SINGLE, "--count", "24", "--backend", "all", "--spawn", *FS_KINDS]},
        "all"),
    "multi-image-50MB": (
        "a multi-image request: 6,976 x 3,584 bf16 = 50.0 MB per item",
        {"fs-shm": ["--tokens", "6976", "--count", "16", *FS_KINDS],
         "fs-tmp": ["--tokens", "6976", "--count", "16", *FS_KINDS, "--url", "fs={tmp}"]},
        None),
    "video-130MB": (
        "a video: 18,136 x 3,584 bf16 = 130.0 MB per item",
        {"fs-shm": ["--tokens", "18136", "--count", "6", *FS_KINDS],
         "fs-tmp": ["--tokens", "18136", "--count", "6", *FS_KINDS, "--url", "fs={tmp}"]},
        None),
    "small-1MB": (
        "many small items: 1 MiB (128 x 4,096 bf16) each",
        {"fs-shm": ["--size", "1MiB", "--hidden", "4096", "--count", "400", *FS_KINDS],
         "fs-tmp": ["--size", "1MiB", "--hidden", "4096", "--count", "400", *FS_KINDS, "--url", "fs={tmp}"]},
        None),
    "concurrency": (
        "single images with 1, 4 and 16 callers saving and loading at once",
        {f"c{c}": [*SINGLE, "--count", "64", "--concurrency", str(c), *FS_KINDS] for c in (1, 4, 16)},
        None),
}


def _spread(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cells: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for doc in runs:
        for r in doc["results"]:
            cells.setdefault((r["backend"], r["kind"], r["op"]), []).append(r)
    out = []
    for (backend, kind, op), rows in cells.items():
        entry: dict[str, Any] = {"backend": backend, "kind": kind, "op": op}
        for field in ("mb_per_s", "p50_ms", "blocked_ms"):
            vals = [r[field] for r in rows if r[field] is not None]
            entry[field] = [min(vals), statistics.median(vals), max(vals)] if vals else None
        out.append(entry)
    return out


def _find(doc: dict[str, Any], backend: str, kind: str, op: str) -> dict[str, Any] | None:
    return next((r for r in doc["results"] if (r["backend"], r["kind"], r["op"]) == (backend, kind, op)), None)


def _ratios(doc: dict[str, Any]) -> dict[str, float]:
    """The issue's target ratios in one run (fs), and each backend's round trip vs its raw client."""
    out: dict[str, float] = {}
    for backend in dict.fromkeys(r["backend"] for r in doc["results"] if r["kind"] == "ectransfer"):
        ec_save, ec_rt = _find(doc, backend, "ectransfer", "save"), _find(doc, backend, "ectransfer", "roundtrip")
        vx_save, vx_rt = _find(doc, backend, "vllm-example", "save"), _find(doc, backend, "vllm-example", "roundtrip")
        raw_rt = _find(doc, backend, "raw", "roundtrip")
        if ec_save and ec_rt and vx_save and vx_rt:
            out[f"{backend} save blocked / vllm-example save (target <= 0.1)"] = ec_save["blocked_ms"] / vx_save["p50_ms"]
            out[f"{backend} round trip / vllm-example (target >= 1.0)"] = ec_rt["mb_per_s"] / vx_rt["mb_per_s"]
        if ec_rt and raw_rt:
            out[f"{backend} round trip / raw (target >= 0.9)"] = ec_rt["mb_per_s"] / raw_rt["mb_per_s"]
    return out


def run_variant(args: list[str], repeat: int, plot: Path | None) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ectransfer-bench-", dir="/tmp") as tmp:
        argv = [a.replace("{tmp}", tmp) for a in args]
        for i in range(repeat):
            out = Path(tmp) / f"run{i}.json"
            png = Path(tmp) / f"run{i}.png"
            cmd = [sys.executable, "-m", "ectransfer.bench.cli", *argv, "--quiet", "--json", str(out)]
            if plot is not None:
                cmd += ["--plot", str(png)]
            print("$", " ".join(cmd[2:]), flush=True)
            proc = subprocess.run(cmd, text=True, capture_output=True, timeout=1800)
            print(proc.stdout, flush=True)
            if proc.returncode != 0:
                raise SystemExit(f"run failed ({proc.returncode}): {proc.stderr[-2000:]}")
            runs.append(json.loads(out.read_text()))
        ratios = [_ratios(doc) for doc in runs]
        names = list(dict.fromkeys(n for r in ratios for n in r))
        if plot is not None:
            key = next((n for n in names if n.startswith("fs round trip / raw")), None)
            order = sorted(range(repeat), key=lambda i: ratios[i].get(key, 0.0) if key else i)
            shutil.copyfile(Path(tmp) / f"run{order[len(order) // 2]}.png", plot)
    command = "ectransfer-bench " + " ".join(a.replace("{tmp}", "/tmp/<fresh dir>") for a in args)
    return {"command": command, "runs": runs, "spread": _spread(runs),
            "ratios": [{"name": n, "values": [r.get(n) for r in ratios]} for n in names]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="default: all")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--tag", default="", help="inserted in the file names: <date>-<tag>-<scenario>.json")
    p.add_argument("--variant", action="append",
                   help="run only these variants; the others already in the result file are kept")
    args = p.parse_args()
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    stem = f"{date}-{args.tag}" if args.tag else date
    can_plot = importlib.util.find_spec("matplotlib") is not None
    if not can_plot:
        print("matplotlib is not installed: no plots (pip install 'ectransfer[bench]')")
    for name in args.scenario or list(SCENARIOS):
        description, variants, plotted = SCENARIOS[name]
        path = args.out / f"{stem}-{name}.json"
        doc: dict[str, Any] = {"scenario": name, "date": date, "description": description, "variants": {}}
        if args.variant and path.exists():
            doc["variants"] = json.loads(path.read_text())["variants"]
        for variant, bench_args in variants.items():
            if args.variant and variant not in args.variant:
                continue
            plot = args.out / f"{stem}-{name}.png" if variant == plotted and can_plot else None
            doc["variants"][variant] = run_variant(bench_args, args.repeat, plot)
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
