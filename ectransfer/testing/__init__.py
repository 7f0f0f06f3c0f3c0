"""The backend conformance kit (ships in the wheel).

A backend proves itself with one subclass of :class:`BackendTests` that says how to open it::

    import pytest
    from ectransfer.testing import BackendTests
    from ectransfer.backends.fs import FsBackend, FsConfig

    class TestFs(BackendTests):
        @pytest.fixture
        def backend_factory(self, tmp_path):
            return lambda **opts: FsBackend(FsConfig(root=str(tmp_path), **opts))

``backend_factory(**options)`` opens a new backend on **one** store shared by every call in
the test (empty at the start of each test); ``options`` may carry ``namespace``. The kit
closes everything it opens. Optional overrides:

* ``reader`` fixture: a second backend that reads what ``backend`` wrote (another process, a
  peer). Defaults to ``backend`` itself.
* :meth:`BackendTests.corrupt`: rewrite the stored bytes of an entry, to prove corruption is
  detected. Without it the corruption tests are skipped with that reason.

Only :class:`BackendTests` (in :mod:`ectransfer.testing.conformance`) needs pytest; the helpers
here and ``ectransfer.testing.servers`` (used by ``ectransfer-bench --spawn``) do not.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["DTYPES", "INVALID_KEYS", "MUTATIONS", "BackendTests", "error_within", "eventually", "make_tensor",
           "same_bits"]

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.int8, torch.uint8]
SHAPES = [(), (7,), (5, 12), (3, 4, 5), (2, 3, 2, 2), (0, 16)]
INVALID_KEYS: list[Any] = ["", ".", "..", "a/b", "../etc", "a\x00b", "caf\u00e9", "sp ace", "x" * 257,
                           "x" * 10_000, "new\nline", None, 123, b"bytes"]


def make_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A deterministic tensor whose every byte pattern is exercised (fp8 included)."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    # Random bytes include NaN patterns: compare with _same (bytes), never with ==.
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality, dtype and shape included."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


# --------------------------------------------------------------------------- mutations
def _split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _join(header: dict[str, Any], payload: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + payload


def _flip_payload(blob: bytes) -> bytes:
    b = bytearray(blob)
    b[-1] ^= 0x5A
    return bytes(b)


def _retype(blob: bytes) -> bytes:
    hdr, payload = _split(blob)
    hdr["ec_cache"]["dtype"] = "F16" if hdr["ec_cache"]["dtype"] != "F16" else "BF16"
    return _join(hdr, payload)


def _reshape(blob: bytes) -> bytes:
    hdr, payload = _split(blob)
    hdr["ec_cache"]["shape"] = list(reversed(hdr["ec_cache"]["shape"]))
    return _join(hdr, payload)


def _bad_header_len(blob: bytes) -> bytes:
    return struct.pack("<Q", 1 << 40) + blob[8:]


#: name -> function rewriting an encoded entry; every one must be detected
MUTATIONS: dict[str, Callable[[bytes], bytes]] = {
    "flipped_payload_byte": _flip_payload,
    "truncated": lambda b: b[:-100],
    "truncated_header": lambda b: b[:12],
    "zero_length": lambda b: b"",
    "trailing_garbage": lambda b: b + b"\x00" * 8,
    "wrong_dtype_header": _retype,
    "lying_shape_header": _reshape,
    "impossible_header_length": _bad_header_len,
    "garbage": lambda b: b"\xde\xad\xbe\xef" * 64,
}


def eventually(call: Callable[[], Any], errors: tuple[type[BaseException], ...], timeout_s: float,
               interval_s: float = 0.2) -> Any:
    """``call()`` until it does not raise one of ``errors``, for at most ``timeout_s`` (then the
    last error propagates): e.g. the first call after a server restart may still meet the dead
    connection."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except errors:
            if time.monotonic() > deadline:
                raise
            time.sleep(interval_s)


def error_within(call: Callable[[], Any], limit_s: float) -> BaseException | None:
    """Run ``call`` on a thread; return what it raised (None: it returned). Raises
    AssertionError if it is still running after ``limit_s``: a hang, not a slow answer."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            raised.append(exc)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(limit_s)
    if th.is_alive():
        raise AssertionError(f"call still running after {limit_s} s: it hangs")
    return raised[0] if raised else None


def __getattr__(name: str) -> Any:
    if name == "BackendTests":  # imported on use: it needs pytest, the rest of the kit does not
        from ectransfer.testing.conformance import BackendTests

        return BackendTests
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
