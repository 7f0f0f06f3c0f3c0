"""The producers a consumer talks to: connections, back-off, cached ``exists``, release/delete.

``exists`` asks every producer in parallel, each answer bounded by ``lookup_timeout_s``;
answers are reused for ``exists_cache_s``, and a producer that failed to answer is skipped by
``exists`` for ``peer_backoff_s``, so a scheduler step is never blocked on a slow or dead peer.
With a single producer (the common case) requests are sent inline: a hand-off to a pool thread
costs a GIL switch interval. Pins the consumer is done with wait in :class:`Peer` and ride on
its next message to that producer.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ectransfer.backends.nixl.config import NixlConfig
from ectransfer.backends.nixl.control import ControlClient
from ectransfer.backends.nixl.producer import Producer
from ectransfer.errors import BackendConnectionError, ECTransferError, TransferTimeoutError

__all__ = ["Peer", "PeerSet"]

log = logging.getLogger(__name__)

_SERVED_MAX = 65536  # remembered key -> producer pairs (release hints), and cached answers
_UNPIN_FLUSH = 1024  # queued unpins sent on their own past this many


class Peer:
    """One producer: its control client, NIXL agent name, back-off and queued unpins."""

    def __init__(self, index: int, host: str, port: int) -> None:
        self.index = index
        self.address = (host, port)
        self.client = ControlClient(host, port)
        self.agent_name: str | None = None
        self.down_until = 0.0
        self.lock = threading.Lock()
        self._unpins: list[list[Any]] = []
        self._unpins_lock = threading.Lock()

    def add_unpins(self, pins: list[list[Any]]) -> int:
        with self._unpins_lock:
            self._unpins += pins
            return len(self._unpins)

    def request(self, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """``message``, carrying the pins this consumer is done with (no message of their own)."""
        with self._unpins_lock:
            pins, self._unpins = self._unpins, []
        if pins:
            message = {**message, "unpin": pins}
        return self.client.request(message, timeout_s)



class PeerSet:
    """Every producer of the URL, minus this process's own (``local``) once it serves."""

    def __init__(self, config: NixlConfig, addresses: tuple[tuple[str, int], ...],
                 local: Callable[[], Producer | None]) -> None:
        self.config = config
        self._local = local
        self.all = [Peer(i, h, p) for i, (h, p) in enumerate(addresses)]
        self.pool = cf.ThreadPoolExecutor(max_workers=4 * len(self.all) + 4, thread_name_prefix="nixl-consumer")
        self._cache: dict[str, tuple[bool, float]] = {}
        self._served: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        self.exists_requests = 0

    def remote(self) -> list[Peer]:
        local = self._local()
        if local is None:
            return self.all
        return [p for p in self.all if p.address != local.server.address]

    def send_each(self, messages: dict[int, dict[str, Any]], timeout_s: float,
                  ) -> tuple[dict[int, dict[str, Any]], dict[int, ECTransferError]]:
        """``messages[i]`` to peer ``i`` (in parallel if several); replies and typed errors by index."""
        replies: dict[int, dict[str, Any]] = {}
        failures: dict[int, ECTransferError] = {}
        if len(messages) == 1:
            index, message = next(iter(messages.items()))
            try:
                replies[index] = self.all[index].request(message, timeout_s)
            except ECTransferError as exc:
                failures[index] = exc
        else:
            futures = {self.pool.submit(self.all[i].request, m, timeout_s): i for i, m in messages.items()}
            done, _ = cf.wait(futures, timeout=timeout_s + 0.5)
            for fut, index in futures.items():
                if fut not in done:
                    failures[index] = TransferTimeoutError(f"nixl producer {self.all[index].client.name} did not answer")
                    continue
                try:
                    replies[index] = fut.result()
                except ECTransferError as exc:
                    failures[index] = exc
        now = time.monotonic()
        for i, failure in failures.items():
            if isinstance(failure, (BackendConnectionError, TransferTimeoutError)):
                self.all[i].down_until = now + self.config.peer_backoff_s
        for i in replies:
            self.all[i].down_until = 0.0
        return replies, failures

    def ask(self, peers: list[Peer], message: dict[str, Any], timeout_s: float,
            ) -> tuple[dict[int, dict[str, Any]], dict[int, ECTransferError]]:
        return self.send_each({p.index: message for p in peers}, timeout_s)

    # ----------------------------------------------------------------- exists
    def exists(self, skeys: list[str]) -> list[bool]:
        now = time.monotonic()
        local = self._local()
        found = local.exists(skeys) if local is not None else [False] * len(skeys)
        ask: list[int] = []
        with self._lock:
            for i, k in enumerate(skeys):
                if found[i]:
                    continue
                cached = self._cache.get(k)
                if cached is not None and cached[1] > now:
                    found[i] = cached[0]
                else:
                    ask.append(i)
        peers = self.remote()
        if not ask or not peers:
            return found
        live = [p for p in peers if p.down_until <= now]
        if not live:
            if local is not None:
                return found
            raise BackendConnectionError(
                f"no nixl producer reachable ({', '.join(p.client.name for p in peers)} failed within "
                f"the last peer_backoff_s={self.config.peer_backoff_s:g} s)")
        self.exists_requests += 1
        keys = [skeys[i] for i in ask]
        replies, failures = self.ask(live, {"op": "exists", "keys": keys}, self.config.lookup_timeout_s)
        if not replies and local is None:
            first = next(iter(failures.values()))
            raise type(first)(f"no nixl producer answered exists: {first}")
        for reply in replies.values():
            for j, hit in enumerate(reply.get("found", [])[: len(keys)]):
                if hit:
                    found[ask[j]] = True
        if self.config.exists_cache_s > 0:
            until = time.monotonic() + self.config.exists_cache_s
            with self._lock:
                if len(self._cache) > _SERVED_MAX:
                    self._cache.clear()
                for i in ask:
                    self._cache[skeys[i]] = (found[i], until)
        return found

    def forget(self, skeys: list[str]) -> None:
        with self._lock:
            for k in skeys:
                self._cache.pop(k, None)

    # ----------------------------------------------------------------- hints and pins
    def hints(self, skeys: list[str]) -> dict[str, int | None]:
        with self._lock:
            return {k: self._served.get(k) for k in skeys}

    def served(self, skey: str, index: int) -> None:
        with self._lock:
            self._served[skey] = index
            self._served.move_to_end(skey)
            while len(self._served) > _SERVED_MAX:
                self._served.popitem(last=False)

    def unpin_later(self, peer: Peer, pins: list[list[Any]]) -> None:
        if peer.add_unpins(pins) > _UNPIN_FLUSH:
            self.flush_unpins(peer)

    def flush_unpins(self, peer: Peer) -> None:
        try:
            peer.request({"op": "unpin"}, self.config.lookup_timeout_s)
        except ECTransferError as exc:  # the pins end by themselves after timeout_s
            log.debug("unpin at %s failed: %s", peer.client.name, exc)

    # ----------------------------------------------------------------- release / delete
    def _free_here(self, skeys: list[str]) -> list[Peer]:
        """Drop cached answers and this process's own copies of ``skeys``; the remote producers."""
        self.forget(skeys)
        local = self._local()
        if local is not None:
            local.free(skeys)
        return self.remote()

    def release(self, skeys: list[str]) -> None:
        """Best effort: tell the producers these entries may be freed (a lease frees them anyway)."""
        peers = self._free_here(skeys)
        if not peers:
            return
        targeted: dict[int, list[str]] = {}
        untargeted: list[str] = []
        with self._lock:
            for k in skeys:
                index = self._served.pop(k, None)
                if index is None:
                    untargeted.append(k)
                else:
                    targeted.setdefault(index, []).append(k)
        calls: dict[int, list[str]] = {i: list(keys) for i, keys in targeted.items()}
        for p in peers if untargeted else []:
            calls.setdefault(p.index, []).extend(untargeted)
        _, failures = self.send_each({i: {"op": "free", "keys": keys} for i, keys in calls.items()},
                                     self.config.lookup_timeout_s)
        for exc in failures.values():
            log.debug("nixl release failed: %s", exc)

    def delete(self, skeys: list[str]) -> None:
        peers = self._free_here(skeys)
        if not peers:
            return
        with self._lock:
            for k in skeys:
                self._served.pop(k, None)
        replies, failures = self.ask(peers, {"op": "free", "keys": skeys}, self.config.timeout_s)
        if not replies and self._local() is None:  # nobody at all could delete them
            raise next(iter(failures.values()))

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        for p in self.all:
            if p.add_unpins([]):
                self.flush_unpins(p)
        self.pool.shutdown(wait=True, cancel_futures=True)
        for p in self.all:
            p.client.close()
