"""The consumer: finds keys at one or more producers and pulls them with NIXL READs.

``exists``, ``release`` and ``delete`` go to the producers through :mod:`.peers`. A fetch looks
the keys up (pinning the versions it will read; a key's last producer is asked first), learns
the producer's NIXL agent once, READs every payload of one producer in **one** transfer and
verifies each checksum; the pins go back with the next message to that producer. ``landing="direct"`` READs straight into the destination tensors
(registered for the call: microseconds for host memory); ``landing="buffer"`` READs into a
receive buffer registered once and copies out, so a destination is never touched by bytes
that fail their checksum.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ectransfer.backends.nixl.agent import Agent, Region
from ectransfer.backends.nixl.arena import Arena, Slot
from ectransfer.backends.nixl.config import BESIDE_MIN, NixlConfig
from ectransfer.backends.nixl.peers import Peer, PeerSet
from ectransfer.backends.nixl.producer import Producer
from ectransfer.codec import (
    EntryHeader,
    HashBeside,
    PayloadVerifier,
    check_destination,
    parse_header,
    payload_view,
    verify_payload,
)
from ectransfer.errors import (
    CapacityError,
    CorruptEntryError,
    ECTransferError,
    EntryNotFoundError,
    IncompatibleTensorError,
    TransferTimeoutError,
)

__all__ = ["Consumer"]

#: ``hash_beside``: entries of BESIDE_MIN bytes or more are READ in pieces of ``_PIECE``, each hashed on a
#: second thread while the next one moves. On the 16-core H200 host, where one cold checksum
#: pass over 9.3 MB took 1.4-1.5 ms beside a 2.3-2.4 ms READ, pieces of 1.2 MB (8) cut READ +
#: checksum from 3.7-3.9 to 2.8-3.3 ms (2.3 MB: 3.0-3.3); on the 2-core development machine
#: it gained nothing (benchmarks/nixl_floor.py).
_PIECE = 1 << 20


class _Want:
    """One key of a fetch: where it is, how it lands."""

    __slots__ = ("dest", "header", "loc", "mismatch", "out", "peer", "skey", "slot", "verifier")

    def __init__(self, skey: str, out: torch.Tensor | None) -> None:
        self.skey, self.out = skey, out
        self.peer: Peer | None = None
        self.loc: dict[str, Any] = {}
        self.header: EntryHeader | None = None
        self.dest: torch.Tensor | None = None
        self.mismatch = False
        self.slot: Slot | None = None
        self.verifier: PayloadVerifier | None = None  # fed during the READ (hash_beside)


class Consumer:
    def __init__(self, config: NixlConfig, namespace: str, agent: Callable[[], Agent],
                 local: Callable[[], Producer | None], remote: bool) -> None:
        self.config = config
        self._namespace = namespace
        self._agent_factory = agent
        self._local = local
        self._peers = PeerSet(config, config.peer_addresses if remote else (), local)
        self._recv: Arena | None = None
        self._recv_cond = threading.Condition()
        self._hasher = cf.ThreadPoolExecutor(4, thread_name_prefix="nixl-hash") if config.hashes_beside else None

    # ----------------------------------------------------------------- queries
    def exists(self, skeys: list[str]) -> list[bool]:
        return self._peers.exists(skeys)

    def release(self, skeys: list[str]) -> None:
        """Best effort: tell the producers these entries may be freed (a lease frees them anyway)."""
        self._peers.release(skeys)

    def delete(self, skeys: list[str]) -> None:
        self._peers.delete(skeys)

    # ----------------------------------------------------------------- fetch
    def fetch(self, skeys: list[str], outs: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """The entries of ``skeys``, landed in ``outs[i]`` where given (else new CPU tensors)."""
        if self._peers.remote():
            # Creating the agent (the first time) takes seconds: before the clock and the pins
            # start, so it neither eats this fetch's timeout_s nor outlasts a pin.
            self._agent_factory()
        deadline = time.monotonic() + self.config.timeout_s
        wants = [_Want(k, o) for k, o in zip(skeys, outs)]
        results: dict[int, torch.Tensor] = {}
        local = self._local()
        remote: list[int] = []
        for i, w in enumerate(wants):
            got = self._read_local(local, w) if local is not None else None
            if got is None:
                remote.append(i)
            else:
                results[i] = got
        if remote:
            try:
                self._locate([wants[i] for i in remote], deadline)
                by_peer: dict[int, list[_Want]] = {}
                for i in remote:
                    peer = wants[i].peer
                    assert peer is not None
                    by_peer.setdefault(peer.index, []).append(wants[i])
                for index, group in by_peer.items():
                    self._pull(self._peers.all[index], group, deadline)
                for i in remote:
                    results[i] = self._finish(wants[i])
            finally:
                self._unpin_later([wants[i] for i in remote])
        return [results[i] for i in range(len(wants))]

    def _read_local(self, local: Producer, w: _Want) -> torch.Tensor | None:
        pinned = local.pin_local(w.skey)
        if pinned is None:
            return None
        item, arena = pinned
        try:
            w.loc = {"head": item.head, "total": item.slot.length}
            self._plan(w)
            assert w.header is not None and w.dest is not None
            if w.header.nbytes:
                src = arena.view(item.slot)[w.header.header_len:]
                w.dest.reshape(-1).view(torch.uint8).copy_(src)
            return self._finish(w)
        finally:
            local.unpin([(item.skey, item.version)])

    def _locate(self, wants: list[_Want], deadline: float) -> None:
        """Look every key up (its hinted producer first, then all others), pinning what is found."""
        peers = self._peers.remote()
        failures: dict[int, ECTransferError] = {}
        hints = self._peers.hints([w.skey for w in wants])
        active = {p.index for p in peers}
        first: dict[int, list[_Want]] = {}
        for w in wants:
            hint = hints[w.skey]
            for p in ([self._peers.all[hint]] if hint is not None and hint in active else peers):
                first.setdefault(p.index, []).append(w)
        self._lookup(first, deadline, failures)
        second: dict[int, list[_Want]] = {}
        for w in wants:
            if w.peer is None and hints[w.skey] in active:  # moved, or saved again elsewhere
                for p in peers:
                    if p.index != hints[w.skey]:
                        second.setdefault(p.index, []).append(w)
        self._lookup(second, deadline, failures)
        pending = [w for w in wants if w.peer is None]
        if pending:
            names = ", ".join(repr(w.skey) for w in pending[:3])
            if failures:
                first_error = next(iter(failures.values()))
                raise type(first_error)(f"entry {names} not found at any reachable nixl producer; {first_error}")
            where = ", ".join(p.client.name for p in peers) or "this process"
            raise EntryNotFoundError(f"no entry for key {names} at nixl producer(s) {where}")

    def _lookup(self, asks: dict[int, list[_Want]], deadline: float, failures: dict[int, ECTransferError]) -> None:
        """Send the lookups of ``asks`` (peer index -> keys) in parallel and record the locations."""
        if not asks:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            for index in asks:
                failures[index] = TransferTimeoutError(f"nixl lookup exceeded timeout_s={self.config.timeout_s:g}")
            return
        pin_s = self.config.timeout_s  # outlasts this fetch's deadline: the bytes stay put while we read

        def ask(index: int) -> dict[str, Any]:
            message = {"op": "lookup", "keys": [w.skey for w in asks[index]], "pin_s": pin_s}
            return self._peers.all[index].request(message, left)

        # One producer (the common case): ask inline; several: in parallel on the pool.
        futures = {i: self._peers.pool.submit(ask, i) for i in asks} if len(asks) > 1 else {}
        for index in asks:
            peer = self._peers.all[index]
            try:
                reply = futures[index].result(timeout=left + 0.5) if futures else ask(index)
            except ECTransferError as exc:
                failures[index] = exc
                continue
            except cf.TimeoutError:
                failures[index] = TransferTimeoutError(f"nixl producer {peer.client.name} did not answer lookup")
                continue
            extra: list[list[Any]] = []
            for w, loc in zip(asks[index], reply.get("items") or []):
                if loc is None:
                    continue
                if w.peer is None:
                    w.peer, w.loc = peer, {**loc, "agent": reply.get("agent") or ""}
                else:
                    extra.append([w.skey, loc["v"]])  # also saved at another producer: let it go
            if extra:
                self._peers.unpin_later(peer, extra)

    def _plan(self, w: _Want) -> None:
        """Parse the header (before any byte moves) and choose the destination tensor."""
        head = w.loc.get("head")
        if not isinstance(head, bytes):
            raise CorruptEntryError(f"entry {w.skey!r}: the producer sent no header")
        header = parse_header(head, key=w.skey)
        if header.total_len != w.loc.get("total"):
            raise CorruptEntryError(
                f"entry {w.skey!r} has {w.loc.get('total')} bytes, its header promises {header.total_len}")
        w.header = header
        if w.out is not None:
            try:
                check_destination(header, w.out, key=w.skey)
                w.dest = w.out
                return
            except IncompatibleTensorError:
                # A header that lies about dtype/shape is corruption, not a caller error:
                # verify the entry as it stands before blaming the destination.
                w.mismatch = True
        w.dest = torch.empty(header.shape, dtype=header.dtype)

    def _ensure_known(self, peer: Peer, agent_name: str, deadline: float) -> None:
        agent = self._agent_factory()
        with peer.lock:
            if agent_name == peer.agent_name and agent.knows(agent_name):
                return
            reply = peer.client.request({"op": "metadata"}, max(deadline - time.monotonic(), 1e-3))
            peer.agent_name = agent.add_remote(reply["metadata"], replaces=peer.agent_name)

    def _pull(self, peer: Peer, group: list[_Want], deadline: float) -> None:
        for w in group:
            self._plan(w)
        moving = [w for w in group if w.header is not None and w.header.nbytes]
        if not moving:
            return
        agent_name = str(moving[0].loc.get("agent") or "")
        self._ensure_known(peer, agent_name, deadline)
        remote: list[Region] = []
        for w in moving:
            assert w.header is not None
            remote.append((int(w.loc["addr"]) + w.header.header_len, w.header.nbytes, int(w.loc["dev"])))
        remote_mem = str(moving[0].loc["mem"])
        agent = self._agent_factory()
        if self.config.landing == "buffer":
            self._pull_buffered(agent, peer, moving, remote, remote_mem, deadline)
            return
        local = [(int(w.dest.data_ptr()), w.header.nbytes, 0) for w in moving]  # type: ignore[union-attr]
        registration = agent.register(local, "DRAM")
        try:
            name = peer.agent_name or agent_name
            pieced = {i for i, (_, n, _) in enumerate(remote) if self._hasher is not None and n >= BESIDE_MIN}
            whole = [i for i in range(len(moving)) if i not in pieced]
            agent.read(name, [local[i] for i in whole], [remote[i] for i in whole], local_mem="DRAM",
                       remote_mem=remote_mem, deadline=deadline)  # the rest of the batch: one READ
            for i in sorted(pieced):
                self._read_hashing(agent, name, moving[i], local[i], remote[i], remote_mem, deadline)
        finally:
            agent.deregister(registration)

    def _read_hashing(self, agent: Agent, peer: str, w: _Want, local: Region, remote: Region, remote_mem: str,
                      deadline: float) -> None:
        """READ one entry in pieces, each hashed on a pool thread while the next one moves."""
        assert self._hasher is not None and w.header is not None and w.dest is not None
        verifier = PayloadVerifier(w.header, namespace=self._namespace, key=w.skey)
        view = payload_view(w.dest)
        beside = HashBeside(self._hasher, verifier)
        try:
            for start in range(0, w.header.nbytes, _PIECE):
                n = min(_PIECE, w.header.nbytes - start)
                agent.read(peer, [(local[0] + start, n, local[2])], [(remote[0] + start, n, remote[2])],
                           local_mem="DRAM", remote_mem=remote_mem, deadline=deadline)
                beside.put(view[start:start + n])
        finally:
            beside.finish()
        w.verifier = verifier

    # ----------------------------------------------------------------- buffer landing
    def _recv_arena(self) -> Arena:
        with self._recv_cond:
            if self._recv is None:
                self._recv = Arena(self._agent_factory(), self.config.recv_buffer_bytes)
            return self._recv

    def _pull_buffered(self, agent: Agent, peer: Peer, moving: list[_Want], remote: list[Region],
                       remote_mem: str, deadline: float) -> None:
        arena = self._recv_arena()
        try:
            with self._recv_cond:
                for w in moving:
                    assert w.header is not None
                    if w.header.nbytes > arena.capacity:
                        raise CapacityError(
                            f"entry {w.skey!r} is {w.header.nbytes} bytes, larger than the nixl receive buffer "
                            f"(recv_buffer_bytes={arena.capacity}); raise it or use landing='direct'")
                    while (slot := arena.allocator.alloc(w.header.nbytes)) is None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise TransferTimeoutError("no room in the nixl receive buffer before timeout_s")
                        self._recv_cond.wait(min(left, 0.05))
                    w.slot = slot
            local = [(arena.base + w.slot.offset, w.slot.length, 0) for w in moving if w.slot is not None]
            agent.read(peer.agent_name or "", local, remote, local_mem="DRAM", remote_mem=remote_mem, deadline=deadline)
            for w in moving:
                assert w.slot is not None and w.header is not None and w.dest is not None
                view = arena.host_view(w.slot)
                verify_payload(w.header, view, namespace=self._namespace, key=w.skey)
                np.copyto(np.asarray(payload_view(w.dest)), np.frombuffer(view, dtype=np.uint8))
        finally:
            with self._recv_cond:
                for w in moving:
                    if w.slot is not None:
                        arena.allocator.free(w.slot)
                        w.slot = None
                self._recv_cond.notify_all()

    # ----------------------------------------------------------------- completion
    def _finish(self, w: _Want) -> torch.Tensor:
        assert w.header is not None and w.dest is not None
        if w.verifier is not None:
            w.verifier.finish()  # every piece was hashed as it landed
        elif self.config.landing != "buffer" or w.peer is None or not w.header.nbytes:
            verify_payload(w.header, payload_view(w.dest), namespace=self._namespace, key=w.skey)
        if w.mismatch:
            assert w.out is not None
            check_destination(w.header, w.out, key=w.skey)  # raises IncompatibleTensorError
        if w.peer is not None:
            self._peers.served(w.skey, w.peer.index)
        return w.dest

    def _unpin_later(self, wants: list[_Want]) -> None:
        """Queue the pins of ``wants`` to travel with the next message to their producer.

        No message (and no thread hand-off) of their own on the load path: the release that
        follows a load carries them; a pin nobody sends back ends after ``timeout_s``.
        """
        for w in wants:
            if w.peer is not None and "v" in w.loc:
                self._peers.unpin_later(w.peer, [[w.skey, w.loc["v"]]])

    # ----------------------------------------------------------------- lifecycle
    def stats(self) -> dict[str, Any]:
        with self._recv_cond:
            recv = self._recv
            return {
                "peers": [p.client.name for p in self._peers.all],
                "exists_requests": self._peers.exists_requests,
                "recv_buffer_bytes": recv.capacity if recv else 0,
                "recv_used_bytes": recv.allocator.used if recv else 0,
            }

    def close(self) -> None:
        self._peers.close()
        if self._hasher is not None:
            self._hasher.shutdown(wait=True)
        if self._recv is not None:
            self._recv.close()
