"""Control frames and typed error replies (ectransfer.framing) on a real socket pair."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from ectransfer import CorruptEntryError, ECTransferError, EntryNotFoundError
from ectransfer.framing import MAX_FRAME, error_from_reply, error_reply, recv_frame, send_frame


def test_frames_round_trip_in_order() -> None:
    a, b = socket.socketpair()
    with a, b:
        msgs = [{"op": "fetch", "items": [["id", "key", 4, "image"]]}, {"blob": b"\x00" * 70_000}, {}]
        for m in msgs:
            send_frame(a, m)
        assert [recv_frame(b, time.monotonic() + 5) for _ in msgs] == msgs


def test_deadline_closed_peer_and_oversized_frame() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack("<I", 10) + b"abc")  # a frame that never completes
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            recv_frame(b, time.monotonic() + 0.3)
        assert time.monotonic() - t0 < 3
    a, b = socket.socketpair()
    with b:
        a.close()
        with pytest.raises(ConnectionResetError):
            recv_frame(b)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack("<I", MAX_FRAME + 1))
        with pytest.raises(ConnectionResetError, match="refused"):
            recv_frame(b)


def test_error_replies_keep_the_ectransfer_class() -> None:
    for exc in (EntryNotFoundError("no entry k"), CorruptEntryError("bad checksum")):
        back = error_from_reply(error_reply(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
    other = error_from_reply(error_reply(ValueError("boom")))
    assert type(other) is ECTransferError and "ValueError: boom" in str(other)
    forged = error_from_reply({"error": "SystemExit", "message": "x"})  # never a non-ectransfer class
    assert type(forged) is ECTransferError
    assert error_from_reply({"result": 1}) is None
