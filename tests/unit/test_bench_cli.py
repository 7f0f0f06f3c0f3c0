"""ectransfer-bench: argument validation, the JSON schema of a tiny real run, skips, the plot.

No timing assertions: the numbers are whatever this machine gives; the tests check their shape.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ectransfer.bench.cli import main
from ectransfer.bench.progress import Progress
from ectransfer.bench.targets import TargetError, parse_url_arg
from ectransfer.registry import registered_backends
from ectransfer.testing.servers import free_port

TINY = ["--count", "2", "--size", "64KiB", "--quiet"]
ROW_TYPES: dict[str, Any] = {"backend": str, "kind": str, "op": str, "item_bytes": int, "count": int,
                             "concurrency": int, "mb_per_s": float, "p50_ms": float, "p99_ms": float}
KINDS = {"ectransfer", "raw", "vllm-example", "ceiling"}
OPS = {"save", "load", "roundtrip"}


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def check_schema(doc: Any) -> list[dict[str, Any]]:
    """Fail unless ``doc`` is the issue's schema; return the result rows."""
    assert isinstance(doc, dict) and set(doc) == {"machine", "config", "results"}, sorted(doc)
    machine, config, results = doc["machine"], doc["config"], doc["results"]
    assert isinstance(machine, dict) and isinstance(config, dict) and isinstance(results, list)
    assert isinstance(machine["cpu_count"], int) and machine["cpu_count"] >= 1
    assert isinstance(machine["torch"], str) and machine["device"] in ("cpu", "cuda")
    assert isinstance(machine["cpu_model"], str)
    assert isinstance(config["command"], str) and config["command"].startswith("ectransfer-bench")
    assert isinstance(config["skipped"], list)
    for row in results:
        assert set(row) == set(ROW_TYPES) | {"blocked_ms"}, sorted(row)
        for key, typ in ROW_TYPES.items():
            assert isinstance(row[key], typ) and not isinstance(row[key], bool), (key, row[key])
        assert row["kind"] in KINDS and row["op"] in OPS
        assert math.isfinite(row["mb_per_s"]) and row["mb_per_s"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        if row["op"] == "save":
            assert isinstance(row["blocked_ms"], float) and row["blocked_ms"] > 0
        else:
            assert row["blocked_ms"] is None
    return list(results)


# ------------------------------------------------------------------ argument validation
@pytest.mark.parametrize(("argv", "message"), [
    (["--size", "12zz"], "--size: expected a byte size"),
    (["--size", "3"], "multiple of 2 bytes"),
    (["--size", "0"], "positive multiple"),
    (["--size", "64KiB", "--tokens", "4"], "--size or --tokens, not both"),
    (["--count", "0"], "positive integer"),
    (["--concurrency", "-2"], "positive integer"),
    (["--dtype", "float7"], "--dtype 'float7' is not one of"),
    (["--backend", "nope"], "unknown backend 'nope'"),
    (["--url", "zzz://host/x"], "unknown scheme 'zzz'"),
    (["--url", "redis:/x"], "'//' missing"),
    (["--backend", "fs", "--url", "memory://x"], "--url for backend 'memory', which --backend does not select"),
    (["--url", "fs=/a", "--url", "/b"], "two --url values for backend 'fs'"),
    (["--json", "/nonexistent-dir/x.json"], "directory /nonexistent-dir does not exist"),
    (["--device", "tpu"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_one_line(capsys: pytest.CaptureFixture[str], argv: list[str],
                                            message: str) -> None:
    rc, out, err = run_main(capsys, *TINY, *argv)  # later flags win
    assert rc == 2
    assert message in err
    assert err.startswith("ectransfer-bench: error: ") and err.count("\n") == 1
    assert out == ""


def test_unusable_fs_url_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc, _, err = run_main(capsys, "--url", f"fs={blocker}/sub", *TINY)
    assert rc == 2
    assert f"backend 'fs': cannot use {blocker}/sub" in err and err.count("\n") == 1


def test_unreachable_server_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    from ectransfer.registry import available_backends

    if not dict((n, ok) for n, ok, _ in available_backends()).get("redis"):
        pytest.skip("the redis backend is not available here: nothing to point at a dead port")
    port = free_port()  # nothing listens there
    rc, _, err = run_main(capsys, "--url", f"redis://127.0.0.1:{port}", *TINY)
    assert rc == 2
    assert f"cannot use redis://127.0.0.1:{port}" in err and err.count("\n") == 1


def test_cuda_without_cuda_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, _, err = run_main(capsys, "--device", "cuda", *TINY)
    assert rc == 2 and "--device cuda: no CUDA device is available here" in err


def test_credentials_never_printed(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_main(capsys, "--url", "zzz://user:hunter2@host/x", *TINY)
    assert rc == 2 and "hunter2" not in out + err and "***" in err


# ------------------------------------------------------------------ URL matching
def test_url_matching() -> None:
    assert parse_url_arg("fs=/mnt/ec") == ("fs", "/mnt/ec")
    assert parse_url_arg("/mnt/ec") == ("fs", "/mnt/ec")
    assert parse_url_arg("file:///mnt/ec?fsync=true") == ("fs", "file:///mnt/ec?fsync=true")
    assert parse_url_arg("memory://x") == ("memory", "memory://x")
    assert parse_url_arg("redis://h:6379/0") == ("redis", "redis://h:6379/0")
    assert parse_url_arg("s3://bucket/p") == ("fsspec", "s3://bucket/p")
    assert parse_url_arg("s3=s3://bucket/p") == ("fsspec", "s3://bucket/p")
    assert parse_url_arg("./data=1") == ("fs", "./data=1")  # not a backend name: a path
    with pytest.raises(TargetError, match="unknown scheme"):
        parse_url_arg("gopher://x")


# ------------------------------------------------------------------ tiny real runs
def test_json_of_a_tiny_run_matches_the_schema(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_json = tmp_path / "out.json"
    rc, out, _ = run_main(capsys, *TINY, "--baseline", "--json", str(out_json))
    assert rc == 0, out
    doc = json.loads(out_json.read_text())
    rows = check_schema(doc)
    got = {(r["backend"], r["kind"], r["op"]) for r in rows}
    assert got == {("fs", k, op) for k in ("ectransfer", "raw") for op in OPS}
    assert all(r["count"] == 2 and r["item_bytes"] == 65536 and r["concurrency"] == 1 for r in rows)
    assert doc["config"]["item_bytes"] == 65536 and doc["config"]["shape"] == [32768]
    # the table is on stdout, with the comparison against the raw client
    assert re.search(r"^fs\s+ectransfer\s+roundtrip\s", out, re.M)
    assert "fs: vs raw client:" in out
    # the default directory is temporary and gone afterwards
    where = doc["config"]["backends"][0]
    if os.access("/dev/shm", os.W_OK):
        assert where["url"].startswith("/dev/shm/") and "tmpfs /dev/shm" in where["where"]
    assert not Path(where["url"]).exists()


def test_concurrency_and_shape_flags(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_json = tmp_path / "c.json"
    rc, _, _ = run_main(capsys, "--backend", "memory", "--tokens", "3", "--hidden", "64", "--dtype", "fp32",
                        "--count", "5", "--concurrency", "3", "--quiet", "--json", str(out_json))
    assert rc == 0
    rows = check_schema(json.loads(out_json.read_text()))
    assert {r["backend"] for r in rows} == {"memory"}
    assert all(r["item_bytes"] == 3 * 64 * 4 and r["count"] == 5 and r["concurrency"] == 3 for r in rows)


def test_backend_all_skips_what_is_unavailable(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from ectransfer import registry

    # A registered backend whose module is missing: the skip path, whatever is installed here.
    monkeypatch.setitem(registry.BUILTIN_BACKENDS, "ghost", "ectransfer.backends.no_such_module:Ghost")
    out_json = tmp_path / "all.json"
    rc, out, _ = run_main(capsys, "--backend", "all", *TINY, "--json", str(out_json))
    assert rc == 0, out
    doc = json.loads(out_json.read_text())
    measured = {r["backend"] for r in check_schema(doc)}
    skipped = {s["backend"]: s["reason"] for s in doc["config"]["skipped"] if s["kind"] == "ectransfer"}
    assert {"fs", "memory"} <= measured
    assert "ghost" in skipped and "cannot be imported" in skipped["ghost"]
    assert re.search(r"^skipped: ghost ectransfer: backend 'ghost' is not available here: .+", out, re.M)
    for name in registered_backends():
        assert (name in measured) != (name in skipped), name
        if name in skipped:
            assert skipped[name] and f"skipped: {name} ectransfer: " in out


def test_named_unavailable_backend_exits_2(capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from ectransfer import registry

    monkeypatch.setitem(registry.BUILTIN_BACKENDS, "ghost", "ectransfer.backends.no_such_module:Ghost")
    rc, _, err = run_main(capsys, "--backend", "ghost", *TINY)
    assert rc == 2 and "backend 'ghost' is not available here" in err


def test_plot_writes_a_png(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (pip install 'ectransfer[bench]')")
    png = tmp_path / "out.png"
    rc, out, _ = run_main(capsys, *TINY, "--baseline", "--plot", str(png))
    assert rc == 0, out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.vllm
def test_vllm_example_rows(tmp_path: Path) -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    out_json = tmp_path / "vx.json"
    # A child process: vLLM's import-time state must not leak into the other tests.
    proc = subprocess.run([sys.executable, "-m", "ectransfer.bench.cli", *TINY, "--vllm-example",
                           "--json", str(out_json)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = check_schema(json.loads(out_json.read_text()))
    assert {(r["kind"], r["op"]) for r in rows if r["kind"] == "vllm-example"} == {("vllm-example", op) for op in OPS}
    assert "fs: save blocks the caller" in proc.stdout and "fs: round trip" in proc.stdout


# ------------------------------------------------------------------ fs data path tuned for the bench targets
@pytest.mark.parametrize(("shape", "aligned"), [((1296, 64), True), ((4, 4), False)])
def test_fs_payload_page_alignment(tmp_path: Path, shape: tuple[int, int], aligned: bool) -> None:
    """Payloads of 64 KiB or more start on a page boundary; the file stays plain safetensors."""
    import struct

    import torch
    from safetensors.torch import load_file

    from ectransfer import open_backend
    from ectransfer.backends.fs import ENTRY_FILE
    from ectransfer.bench.workload import same_bits
    from ectransfer.codec import encode

    t = torch.randint(0, 256, (shape[0] * shape[1] * 2,), dtype=torch.uint8).view(torch.bfloat16).reshape(shape)
    with open_backend(str(tmp_path)) as be:
        be.put("mmhash-a", t)
        out = torch.zeros_like(t)
        be.get_into("mmhash-a", out)
    assert same_bits(out, t)
    blob = (tmp_path / "mmhash-a" / ENTRY_FILE).read_bytes()
    payload_offset = 8 + struct.unpack_from("<Q", blob)[0]
    assert len(blob) == payload_offset + t.numel() * 2
    if aligned:
        assert payload_offset % 4096 == 0
    else:
        assert payload_offset == len(encode(t).header)  # small entries are not padded
    assert same_bits(load_file(str(tmp_path / "mmhash-a" / ENTRY_FILE))["ec_cache"], t)


# ------------------------------------------------------------------ progress bar
class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_only_on_a_tty_and_when_enabled() -> None:
    tty = _Tty()
    p = Progress(4, stream=tty)
    p.label("fs ectransfer")
    p.advance(4)
    p.close()
    assert "4/4 items" in tty.getvalue() and "fs ectransfer" in tty.getvalue()
    for stream, enabled in ((_Tty(), False), (io.StringIO(), True)):
        q = Progress(4, stream=stream, enabled=enabled)
        q.label("x")
        q.advance(4)
        q.close()
        assert stream.getvalue() == ""
